"""The ``switch-adapter`` command line: convert, convert-lora, flex, inspect, merge, export-lora, push.

Run ``switch-adapter --help`` (or ``python -m switch_adapter.cli --help``) for the commands and examples. Errors end
with a non-zero exit code and a message on stderr; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import _cli_commands as commands

PROG = "switch-adapter"
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")
MODEL_HELP = "a local folder or a Hub repository id"

EXAMPLES = {
    None: """\
examples:
  switch-adapter convert ./base-model ./finetuned-model -o my-switch --density 0.05
  switch-adapter convert-lora HuggingFaceTB/SmolLM2-135M-Instruct you/smollm2-lora -o smollm2-switch
  switch-adapter flex ./base-model ./finetuned-model --examples task.txt --budget 0.5% -o my-flexswitch
  switch-adapter inspect my-switch
  switch-adapter merge ./base-model my-switch -o merged-model
  switch-adapter export-lora my-switch --base ./base-model -o my-switch-lora --rank 32
  switch-adapter push my-switch you/my-switch

Models and adapters are named by a local folder or a Hub repository id. Hub access uses --token, else the
HF_TOKEN environment variable or the saved login (`hf auth login`). Run `switch-adapter COMMAND --help` for the
options of each command.""",
    "convert": """\
examples:
  switch-adapter convert ./bert-base ./bert-finetuned-sst2 -o sst2-switch --task-type SEQ_CLS \\
      --modules-to-save classifier
  switch-adapter convert HuggingFaceTB/SmolLM2-135M you/smollm2-tuned -o smollm2-switch --density 0.03 \\
      --target-modules all-linear --revision main
  switch-adapter convert base.safetensors finetuned.safetensors -o my-switch --model-factory mypackage.nets:make_net

A plain torch.nn.Module (not a transformers model) is read from safetensors state dicts (a file, an index, or a
folder of shards) with --model-factory naming its class or a function that builds it.""",
    "convert-lora": """\
examples:
  switch-adapter convert-lora ./base-model ./my-lora -o my-switch
  switch-adapter convert-lora HuggingFaceTB/SmolLM2-135M-Instruct you/smollm2-lora -o smollm2-switch \\
      --mode factors --value-bits 2 --density 1.0
  switch-adapter convert-lora ./other-base ./my-lora -o my-switch --force   # LoRA made on another base""",
    "flex": """\
examples:
  switch-adapter flex ./bert-base ./bert-finetuned-sst2 --examples sst2.txt --budget 0.5% -o sst2-flex \\
      --modules-to-save classifier
  switch-adapter flex HuggingFaceTB/SmolLM2-135M you/smollm2-lora --examples prompts.jsonl --budget 2MB \\
      -o smollm2-flex --bit-widths 1 2 4 --steps 300
  switch-adapter flex ./base-model ./finetuned-model --examples you/my-dataset --split validation \\
      --text-column sentence --limit 200 -o my-flex

Learns per tensor a density, a bit-width and a scale by distilling the fine-tune (a full fine-tune or a LoRA
adapter) on the examples: a text file (one per line), JSONL or CSV (--text-column, default text), a folder saved
with datasets' save_to_disk, or a Hub dataset id. The output is a T-Switch adapter folder (load it with
PeftModel.from_pretrained) with the base's tokenizer files and units.png (density and bits per tensor; needs
matplotlib).""",
    "inspect": """\
examples:
  switch-adapter inspect my-switch
  switch-adapter inspect you/my-switch --revision main --json > my-switch.json
  switch-adapter inspect my-switch --plot units.png   # density and bit-width per unit (needs matplotlib)""",
    "merge": """\
examples:
  switch-adapter merge ./base-model my-switch -o merged-model
  switch-adapter merge ./base-model switch-a switch-b --weights 0.5 0.5 -o merged-ab --dtype bfloat16
  switch-adapter merge base.safetensors my-switch -o merged-net --model-factory mypackage.nets:make_net

The output is a plain transformers model folder (with the base's tokenizer files): transformers, vLLM or TGI load
it without switch-adapter. A plain torch.nn.Module base (--model-factory) gives model.safetensors (its state dict)
and model_class.json naming its class.""",
    "export-lora": """\
examples:
  switch-adapter export-lora my-switch --base ./base-model -o my-lora --rank 32
  switch-adapter export-lora you/my-switch -o my-lora --rank 64 --include-norms --exclude-modules embed_tokens lm_head

The LoRA approximates each switched weight by a truncated SVD; the relative error per module and overall is
printed and saved as lora_export_report.json. Plain peft loads it: PeftModel.from_pretrained(base, "my-lora").""",
    "push": """\
examples:
  switch-adapter push my-switch you/my-switch
  switch-adapter push my-switch you/my-switch --private --commit-message "density 0.05" """,
}


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=36)


def _common(parser: argparse.ArgumentParser, *, hub: bool = True, progress: bool = True) -> None:
    group = parser.add_argument_group("general")
    if hub:
        group.add_argument("--token", help="Hub token (default: the HF_TOKEN environment variable or the saved login)")
    if progress:
        group.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what happens")
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")


def _output(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help=f"folder to write the {what} to")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")


def _model_factory(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-factory",
        metavar="MODULE:NAME",
        help="for a plain torch.nn.Module (not a transformers model): the class, or a function returning the model "
        "without arguments, as an import path (e.g. mypackage.models:make_net); the models are then safetensors "
        "state dicts (a .safetensors file, an index, or a folder of shards)",
    )


def _config_default(name: str):
    """The default of ``TSwitchConfig.<name>``: the command line has no defaults of its own."""
    from .tswitch.config import TSwitchConfig

    return TSwitchConfig.__dataclass_fields__[name].default


def _flex_default(name: str):
    """The default of ``FlexSwitchConfig.<name>``."""
    from .flexswitch.config import FlexSwitchConfig

    return FlexSwitchConfig.__dataclass_fields__[name].default


def _switch_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("switch configuration (TSwitchConfig; unset options keep its defaults)")
    group.add_argument(
        "--density",
        type=float,
        help=f"keep ratio per sign and tensor, in (0, 1] (default {_config_default('density'):g})",
    )
    group.add_argument(
        "--scale-rule",
        choices=("norm", "rms"),
        help="the scale of each switch: 'norm' keeps the norm of the tensor's task vector, 'rms' is the reference's "
        f"RMS of the kept entries (default {_config_default('scale_rule')})",
    )
    group.add_argument(
        "--keep-ties",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep every entry tied at the cut, as the reference does, instead of exactly the quota "
        f"(default {'--keep-ties' if _config_default('keep_ties') else '--no-keep-ties'})",
    )
    group.add_argument(
        "--target-modules",
        nargs="+",
        metavar="NAME",
        help="modules to switch: name suffixes (space or comma separated), 'all-linear', or 'all' (default)",
    )
    group.add_argument(
        "--scale-granularity", choices=("tensor", "row"), help="one scale per tensor (default) or per output row"
    )
    group.add_argument("--task-type", choices=TASK_TYPES, help="PEFT task type, e.g. SEQ_CLS or CAUSAL_LM")
    group.add_argument(
        "--modules-to-save", nargs="+", metavar="NAME", help="modules kept in full precision, e.g. classifier"
    )
    group.add_argument("--switch-norms", action="store_true", default=None, help="also switch every norm layer")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``switch-adapter`` (one subparser per command)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert fine-tunes and LoRA adapters to T-Switch adapters (or learn FlexSwitches under a "
        "storage budget), inspect them, merge them into a base model, export them as LoRA, and push them to the Hub.",
        epilog=EXAMPLES[None],
        formatter_class=_formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help_text, description=help_text, epilog=EXAMPLES[name], formatter_class=_formatter
        )

    convert = command("convert", "Convert a full fine-tuned checkpoint to a T-Switch adapter (finetuned - base).")
    convert.add_argument("base", help=f"the pre-trained model: {MODEL_HELP}")
    convert.add_argument("finetuned", help=f"the fine-tuned model: {MODEL_HELP}")
    _output(convert, "T-Switch adapter")
    convert.add_argument("--revision", help="Hub revision of the fine-tuned model")
    convert.add_argument("--base-revision", help="Hub revision of the base model")
    _model_factory(convert)
    _switch_config_options(convert)
    _common(convert)
    convert.set_defaults(func=commands.convert)

    lora = command("convert-lora", "Convert a PEFT LoRA adapter to a T-Switch adapter.")
    lora.add_argument("base", help=f"the base model of the LoRA: {MODEL_HELP}")
    lora.add_argument("lora", help=f"the LoRA adapter: {MODEL_HELP}")
    _output(lora, "T-Switch adapter")
    lora.add_argument(
        "--mode",
        choices=("delta", "factors"),
        default="delta",
        help="binarize the product scaling * B @ A (delta, default) or keep it low-rank: a pair of switched factors "
        "per weight (factors; format version 5)",
    )
    lora.add_argument(
        "--value-bits",
        type=int,
        choices=(1, 2, 4, 8),
        default=1,
        help="bits per kept value of the factors in factors mode (default 1: the sign); with --density 1.0, 2 bits "
        "take about 1/8 of the LoRA's fp16 bytes",
    )
    lora.add_argument("--force", action="store_true", help="convert even if the LoRA names another base model")
    lora.add_argument("--revision", help="Hub revision of the LoRA adapter")
    lora.add_argument("--base-revision", help="Hub revision of the base model")
    _model_factory(lora)
    _switch_config_options(lora)
    _common(lora)
    lora.set_defaults(func=commands.convert_lora)

    flex = command(
        "flex", "Learn a FlexSwitch: per tensor a density, bit-width and scale under a storage budget (distillation)."
    )
    flex.add_argument("base", help=f"the pre-trained model: {MODEL_HELP}")
    flex.add_argument("finetuned", help=f"the full fine-tune or LoRA adapter made on the base: {MODEL_HELP}")
    flex.add_argument(
        "--examples",
        required=True,
        metavar="SOURCE",
        help="about 100 inputs of the task: a .txt (one per line), .jsonl or .csv file, a datasets save_to_disk "
        "folder, or a Hub dataset id",
    )
    _output(flex, "adapter")
    flex.add_argument("--revision", help="Hub revision of the fine-tuned model or LoRA adapter")
    flex.add_argument("--base-revision", help="Hub revision of the base model")
    data = flex.add_argument_group("calibration examples")
    data.add_argument("--text-column", metavar="COL", help="column holding the text (JSONL, CSV, datasets)")
    data.add_argument("--split", default="train", help="dataset split of a datasets folder or Hub id (default train)")
    data.add_argument("--limit", type=int, default=100, help="use at most this many examples; 0: all (default 100)")
    training = flex.add_argument_group("training (FlexSwitchConfig; unset options keep its defaults)")
    training.add_argument(
        "--budget",
        help="size of the adapter file: bits per parameter ('0.16'), percent of fp32 ('0.5%%') or a file size ('2MB') "
        f"(default {_flex_default('budget').replace('%', '%%')})",
    )
    training.add_argument(
        "--bit-widths",
        nargs="+",
        type=int,
        choices=(1, 2, 4, 8),
        metavar="BITS",
        help="candidate bits per kept value, from 1 2 4 8 (default: all four)",
    )
    training.add_argument("--steps", type=int, help=f"optimisation steps (default {_flex_default('steps')})")
    training.add_argument("--batch-size", type=int, help=f"examples per step (default {_flex_default('batch_size')})")
    training.add_argument(
        "--max-length", type=int, help=f"tokens per text example (default {_flex_default('max_length')})"
    )
    training.add_argument(
        "--loss",
        choices=("auto", "kl", "mse"),
        help="kl on logits, mse on outputs, or auto: kl when the model returns logits (default auto)",
    )
    training.add_argument("--seed", type=int, help=f"seed (default {_flex_default('seed')})")
    training.add_argument(
        "--lora-factors",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="from a LoRA: learn each update as a low-rank pair of its factors (default), or, with "
        "--no-lora-factors, as a sparse switch of the dense update",
    )
    training.add_argument(
        "--target-modules",
        nargs="+",
        metavar="NAME",
        help="modules to switch: name suffixes (space or comma separated), 'all-linear', or 'all' (default)",
    )
    training.add_argument("--exclude-modules", nargs="+", metavar="NAME", help="modules not to switch")
    training.add_argument(
        "--modules-to-save", nargs="+", metavar="NAME", help="modules kept in full precision, e.g. classifier"
    )
    training.add_argument("--task-type", choices=TASK_TYPES, help="PEFT task type, e.g. SEQ_CLS or CAUSAL_LM")
    _common(flex)
    flex.set_defaults(func=commands.flex)

    inspect = command(
        "inspect", "Show per-unit density, value bits, encoding, bits per parameter and bytes of a T-Switch adapter."
    )
    inspect.add_argument("adapter", help=f"the T-Switch adapter: {MODEL_HELP}")
    inspect.add_argument("--revision", help="Hub revision of the adapter")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument(
        "--plot",
        metavar="PNG",
        help='also write a plot of the density and bit-width of every unit (needs pip install "switch-adapter[plot]")',
    )
    _common(inspect, progress=False)
    inspect.set_defaults(func=commands.inspect)

    merge = command("merge", "Merge T-Switch adapters into the base model: a plain transformers model folder.")
    merge.add_argument("base", help=f"the base model: {MODEL_HELP}")
    merge.add_argument("adapters", nargs="+", metavar="adapter", help=f"T-Switch adapter(s): {MODEL_HELP}")
    _output(merge, "model")
    merge.add_argument(
        "--weights", nargs="+", type=float, metavar="W", help="one weight per adapter: base + sum W * delta (default 1)"
    )
    merge.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="dtype of the saved weights")
    merge.add_argument("--revision", help="Hub revision of the adapters")
    merge.add_argument("--base-revision", help="Hub revision of the base model")
    _model_factory(merge)
    _common(merge)
    merge.set_defaults(func=commands.merge)

    export = command("export-lora", "Export a T-Switch adapter as a PEFT LoRA adapter (truncated SVD).")
    export.add_argument("adapter", help=f"the T-Switch adapter: {MODEL_HELP}")
    _output(export, "LoRA adapter")
    export.add_argument("--base", help=f"the base model ({MODEL_HELP}); default: the one the adapter names")
    export.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    export.add_argument("--lora-bias", action="store_true", help="carry bias deltas exactly (peft's lora_bias)")
    export.add_argument(
        "--include-norms", action="store_true", help="carry norm layers exactly as full-precision modules_to_save"
    )
    export.add_argument("--exclude-modules", nargs="+", metavar="NAME", help="modules to leave out, e.g. lm_head")
    export.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="LoRA dtype")
    export.add_argument("--svd-method", choices=("auto", "exact", "randomized"), default="auto", help="SVD algorithm")
    export.add_argument("--revision", help="Hub revision of the adapter")
    export.add_argument("--base-revision", help="Hub revision of the base model")
    _model_factory(export)
    export.add_argument("--json", action="store_true", help="print the report as JSON")
    _common(export)
    export.set_defaults(func=commands.export_lora)

    push = command("push", "Upload a local T-Switch adapter folder to a Hub repository, with its model card.")
    push.add_argument("folder", help="the local adapter folder")
    push.add_argument("repo_id", help="the Hub repository, e.g. you/my-switch (created if missing)")
    push.add_argument("--revision", help="branch to push to")
    push.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    push.add_argument("--commit-message", help="commit message")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    _common(push, progress=False)
    push.set_defaults(func=commands.push)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``switch-adapter`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors (argparse prints them)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    debug = getattr(args, "debug", False)
    _configure_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        print(f"{PROG} {args.command}: error: {_message(error)}", file=sys.stderr)
        return 1


def _message(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return text.strip() or type(error).__name__


def _configure_logging(verbose: bool, quiet: bool) -> None:
    logging.basicConfig(format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("switch_adapter").setLevel(logging.INFO if verbose else logging.WARNING)
    if quiet:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging

        disable_progress_bars()
        transformers_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
