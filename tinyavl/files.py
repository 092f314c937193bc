"""The user's files: reading a model folder's files (check_readable, read_json_object), and writing a user's
outputs safely: never half a file, never over an input, never over a file the user named (check_output_file)
or a folder of files without being asked (--force).

Every command checks its output paths before it works (check_output_file, check_new_folder) and writes
its outputs through write_file_atomically or write_folder_atomically. A file or folder is first written under a
temporary name beside its destination and then renamed into place in one step (`os.replace`, atomic on
one file system), so an error, a Ctrl-C or a SIGTERM (which the commands raise as an exception:
`cli.signals_end_like_ctrl_c`) midway leaves the destination as it was. A file that may not replace one is
linked into place instead (`os.link` refuses a name that exists), so that a file made at that name during
the minutes of work, after the check, is not replaced either. The new file's bytes reach the disk before
the rename, and the rename before the write returns (`to_disk`): a power cut cannot leave an empty file under
the name, nor a trainer's folder lost after its checkpoint was deleted.
"""
import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from tinyavl.errors import UserError

# The picture formats an output may be: those of these that this Pillow writes. Pillow registers more
# suffixes, but some formats it only reads, and others it writes in modes an RGB picture is not.
PICTURE_SUFFIXES = tuple(suffix for suffix in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
                         if Image.registered_extensions().get(suffix) in Image.SAVE)


@contextmanager
def as_user_error(label: str, only_errno: int | None = None):
    """What the file system refuses while a path is checked (a name too long for it, a loop of links: an
    OSError or RuntimeError) as a UserError naming `label`; with only_errno, only an OSError of that errno."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if only_errno is not None and getattr(err, "errno", None) != only_errno:
            raise
        raise UserError(f"{label}: {getattr(err, 'strerror', None) or err}") from None


def name_too_long_as_user_error(label: str):
    """An input's path checked: a name too long for the file system (ENAMETOOLONG, which Path.exists raises
    before Python 3.14) as a UserError naming `label`, a mistake in the path given; any other OSError (a folder
    on the path that may not be searched) stays what the system refused (status 1), as the file's read would."""
    return as_user_error(label, only_errno=errno.ENAMETOOLONG)


def check_readable(path: Path) -> None:
    """Open and close `path`: a file the system will not let this process read (no permission) fails here,
    as the OSError that says so (one line, status 1: `cli.ended_in_one_line`). The libraries that read model files
    report it otherwise: safetensors as a missing file, tokenizers inside a message about a damaged one."""
    with open(path, "rb"):
        pass


def read_json_object(path: Path, optional: bool = False) -> dict | None:
    """The JSON object a model folder's file holds (config.json, a shard index, the processor's files); with
    `optional`, None where the file is absent. UserError if it is not a JSON object in UTF-8."""
    if optional and not path.is_file():
        return None
    remedy = "download it again" + (", or delete it to use the defaults" if optional else "")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    # ValueError: JSONDecodeError, and a number too long for Python's int; RecursionError: arrays nested deep.
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UserError(f"{path} is not valid JSON ({err}): {remedy}") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(type(data), "a number")
        raise UserError(f"{path} holds {kind}, not a JSON object: {remedy}")
    return data


def check_output_file(path: Path, flag: str, inputs: list[Path], suffixes: tuple = PICTURE_SUFFIXES,
                      replace: bool = False) -> None:
    """UserError unless an output file can be written at `path` without touching the inputs: not one of
    them, nor inside an input folder (a model folder), nor an existing file unless `replace` (a command's
    --force, or a file the command itself resumes from). Its name ends in one of `suffixes`."""
    with as_user_error(f"{flag} {path}"):
        if path.parent.exists() and not path.parent.is_dir():
            raise UserError(f"{flag} {path}: {path.parent} is a file, not a folder")
        if not path.parent.is_dir():
            raise UserError(f"{flag} {path}: folder {path.parent} does not exist")
        if path.name.lower() in suffixes:  # a name that starts with a dot is all stem: ".png" has no suffix
            raise UserError(f"{flag} {path}: the name is a suffix alone: give it a name before {path.name}")
        if path.suffix.lower() not in suffixes:
            raise UserError(f"{flag} {path}: give it a {', '.join(suffixes)} name")
        # lexists: a link that points nowhere is still a name the user made, not a free one.
        exists = os.path.lexists(path)
        if path.is_dir() or not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise UserError(f"{flag} {path}: cannot write there (no permission, or it is a folder)")
        check_apart_from_inputs(path, flag, inputs)  # first: no --force replaces an input
        if exists and not replace:
            raise UserError(f"{flag} {path} already exists: give another name, or --force to replace it")


def check_picture_folder(folder: Path, flag: str, names, inputs: list[Path], replace: bool = False) -> None:
    """UserError unless the pictures `names` can be written into `folder`: an existing folder where each name
    is free (or `replace`), or one that can be made (the command makes it when it writes), apart from the
    inputs. Unlike a model folder (check_new_folder), it may hold other files: only the named ones change."""
    with as_user_error(f"{flag} {folder}"):
        check_apart_from_inputs(folder, flag, inputs)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{flag} {folder} is a file: give a folder")
        if folder.is_symlink() and not folder.exists():  # exists() follows the link
            raise UserError(f"{flag} {folder} is a link to nothing: give a folder")
        if not folder.exists():
            check_can_make(folder, label=f"{flag} {folder}")
        for name in names if folder.is_dir() else ():
            check_output_file(folder / name, flag, inputs, suffixes=(".png",), replace=replace)


def check_apart_from_inputs(path: Path, flag: str, inputs: list[Path], replaced_whole: bool = False) -> None:
    """UserError, whatever --force says, if an output file or folder `path` is one of the inputs or lies
    inside an input folder; and if `replaced_whole`, a folder that a write replaces as a whole, if it
    holds an input (a folder that only receives files may)."""
    target = path.resolve()
    for given in resolved_inputs(inputs):
        # samefile too: on a file system that ignores case, or through a hard link, two different paths can
        # name one file.
        same = target == given or (target.exists() and given.exists() and os.path.samefile(target, given))
        if same:
            why = f"would overwrite the input {given}"
        elif given in target.parents:
            why = f"lies inside the input folder {given}"
        elif replaced_whole and target in given.parents:
            why = f"would replace a folder that holds the input {given}"
        else:
            continue
        raise UserError(f"{flag} {path}".strip() + f" {why}: choose another path")


def resolved_inputs(inputs: list[Path]):
    """Each input resolved, and for a folder each of its entries resolved too: a folder of links (as the
    Hugging Face cache lays out a model) reads files that live elsewhere, and those are inputs as well."""
    for given in map(Path.resolve, inputs):
        yield given
        # What cannot be listed (a folder that can be entered, not read) or resolved (a stray loop of links)
        # is left out: loading opens the files by name, and reads none of those.
        try:
            entries = list(given.iterdir()) if given.is_dir() else []
        except OSError:
            entries = []
        for entry in entries:
            try:
                yield entry.resolve()
            except (OSError, RuntimeError):
                continue


def temporary_beside(path: Path, kind: str) -> Path:
    """A hidden name beside `path` for a write's temporary file or folder (kind: "partial", "old"): short, as
    `path`'s own name may be as long as a name can be, and unique to the write, so that no file or folder of
    the user's that happens to be called so is touched."""
    return path.with_name(f".{path.name[:32]}.{os.urandom(4).hex()}.{kind}")


def to_disk(path: Path) -> None:
    """Wait until what the operating system holds of `path` is on the disk (os.fsync): a file's bytes, or a
    folder's entries (the names a rename made there). Without it a rename can reach the disk before the
    bytes it names, and a power cut then leaves an empty file under the new name. A system that cannot
    sync a folder (Windows does not open one; some file systems refuse) leaves it as it is."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():  # a system that does not open folders (Windows): nothing to sync them with
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError as err:
        if not path.is_dir() or err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(descriptor)


def tree_to_disk(folder: Path) -> None:
    """`to_disk` for every file and folder under `folder` (not the links), then for `folder` itself."""
    for inner in folder.iterdir():
        if not inner.is_symlink():
            (tree_to_disk if inner.is_dir() else to_disk)(inner)
    to_disk(folder)


def write_file_atomically(path, write, replace: bool = False) -> None:
    """write(partial_path) writes the file; it then takes the name `path`, replacing a file there only if
    `replace` (a command's --force, or a file the command owns). Whatever stops the write (an error, a full
    disk, Ctrl-C, a SIGTERM raised as `cli.Terminated`) leaves `path` as it was and no temporary file;
    without `replace`, a file that appeared at `path` while the work ran stays, and the write ends in a
    UserError."""
    path = Path(path)
    partial = temporary_beside(path, "partial")
    try:
        with naming(path, partial):
            write(partial)
            to_disk(partial)
        if replace:
            if os.path.exists(path):  # the file replaced keeps its permissions (a private 0600 stays private)
                shutil.copymode(path, partial)
            os.replace(partial, path)
        else:
            link_without_replacing(partial, path)
        to_disk(path.parent)
    except (FileNotFoundError, NotADirectoryError) as err:
        if not path.parent.is_dir():
            raise UserError(f"{path.parent} was removed while this command ran: {path} was not written") from None
        if err.filename == str(path):  # a folder that refuses new files though it looks writable (/proc)
            raise UserError(f"{path} cannot be written there ({err.strerror}): choose another folder") from None
        raise  # not the user's doing: a bug's traceback
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def naming(path: Path, partial: Path):
    """An OSError that names no file (a full disk, met by a library writing a file), or names the write's
    temporary `partial`, names `path`: the output the user asked for, in the one line the commands print."""
    try:
        yield
    except OSError as err:
        if err.filename in (None, str(partial)):
            err.filename = str(path)
        raise


def link_without_replacing(partial: Path, path: Path) -> None:
    """Give the finished file `partial` the name `path` too, unless a file (or a link) has that name: a
    link, unlike a rename, refuses an existing name, in the same step as it takes a free one."""
    appeared = UserError(f"{path} appeared while this command ran: it was kept, and the new output was not "
                         "written; give another name, or --force to replace it")
    try:
        os.link(partial, path)
    except FileExistsError:
        raise appeared from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):  # ENOSYS: some FUSE file systems
            raise
        # A file system without hard links: check, then rename (a file made in between would be replaced).
        if os.path.lexists(path):
            raise appeared from None
        os.replace(partial, path)


def check_utf8_path(path: Path, label: str) -> None:
    """UserError for a path that is no UTF-8 (a Linux name may hold any bytes): tokenizers and safetensors,
    which read and write a model's files, take UTF-8 paths only. label: what the path is."""
    try:
        os.fsdecode(path).encode("utf-8")
    except UnicodeEncodeError:  # Python holds the bytes that are no UTF-8 as lone surrogates
        raise UserError(f"{label} {os.fsdecode(path)!r} is not UTF-8, and tokenizers and safetensors, which "
                        "read and write the model's files, take UTF-8 paths only: rename it") from None


def check_new_folder(folder: Path, replace: bool, inputs: list[Path] = ()) -> None:
    """UserError unless `folder` may be written: it is apart from the inputs (check_apart_from_inputs), is
    not the current folder or one above it, and does not exist (its nearest existing parent a folder that
    can be written to), is an empty folder, or `replace` (a command's --force) lets it go; a link, even to
    an empty folder or to nothing, is a name the user made, replaced (the link, not what it leads to) only
    with `replace`. Commands call this before their work, not after an hour of training."""
    check_utf8_path(folder, "the model folder")
    with as_user_error(str(folder)):
        check_apart_from_inputs(folder, "", inputs, replaced_whole=True)  # first: no --force replaces an input
        target, here = folder.resolve(), Path.cwd().resolve()
        if target == here or target in here.parents:
            raise UserError(f"{folder} is the current folder or holds it: give a folder below it")
        if folder.is_symlink():
            if not replace:
                raise UserError(f"{folder} is a link: give another folder, or --force to replace the link (what "
                                "it leads to stays)")
        elif folder.exists() and not folder.is_dir():
            raise UserError(f"{folder} is a file: give a folder")
        elif folder.is_dir() and any(folder.iterdir()) and not replace:
            raise UserError(f"{folder} already holds files: give another folder, or --force to replace it")
        # The write's temporary folders go beside the folder as named (not where a link resolves to).
        check_can_make(folder)


def check_can_make(folder: Path, label: str = "") -> None:
    """UserError unless `folder` (and any missing folders above it) can be made where it is named: its
    nearest existing parent is a folder that can be written to. The message names it by `label` (the
    flag that gave it and the folder), or by its path."""
    label = label or str(folder)
    with as_user_error(label):
        parent = Path(os.path.abspath(folder)).parent
        while not parent.exists():
            if parent.is_symlink():  # exists() follows the link: mkdir could make no folder there
                raise UserError(f"{label} cannot be made: {parent} is a link to nothing")
            parent = parent.parent
        if not parent.is_dir():
            raise UserError(f"{label} cannot be made: {parent} is a file")
        if not os.access(parent, os.W_OK):
            raise UserError(f"{label} cannot be made: {parent} cannot be written to")


def write_folder_atomically(folder, write, replace: bool = False) -> None:
    """write(partial_folder) fills a new folder; it then takes the place of `folder` (an existing one
    holding files only with replace, as check_new_folder says)."""
    folder = Path(folder)
    # Again, though the command checked before its work: during an hour of training the folder may have
    # appeared or filled. (The inputs were checked then; they have not moved into it since.)
    check_new_folder(folder, replace)
    partial, old = temporary_beside(folder, "partial"), temporary_beside(folder, "old")
    # The folders mkdir makes above the new one: their names, too, must reach the disk (`to_disk` below).
    made_above = [above for above in Path(os.path.abspath(folder)).parents if not above.exists()]
    try:
        with naming(folder, partial):
            try:
                partial.mkdir(parents=True)
            except FileNotFoundError as err:  # a folder that refuses new entries though it looks writable (/proc)
                raise UserError(f"{folder} cannot be made there ({err.strerror}): choose another folder") from None
            write(partial)
            tree_to_disk(partial)
        if replace:
            swap_in(partial, folder, old)
        else:
            rename_without_replacing(partial, folder)
        for directory in dict.fromkeys([folder.parent, *(above.parent for above in made_above)]):
            to_disk(directory)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        # The old folder, once the new one holds its name: removed even when a Ctrl-C came after the renames.
        if os.path.lexists(old) and os.path.lexists(folder):
            if old.is_symlink():  # the old folder was a link: remove the link, not what it points to
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)


def rename_without_replacing(partial: Path, folder: Path) -> None:
    """The finished folder `partial` takes the name `folder` in one rename, which takes a free name or an empty
    folder and refuses anything else: a folder that appeared or filled (or a file, a link) during the work
    stays, and the command ends in a UserError."""
    try:
        os.replace(partial, folder)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise UserError(f"{folder} appeared or filled while this command ran: it was kept, and the new "
                        "output was not written; give another folder, or --force to replace it") from None


def swap_in(partial: Path, folder: Path, old: Path) -> None:
    """The finished folder `partial` takes the place of `folder`, whatever is there moved to `old` first (two
    renames: the old one is out of the way for an instant); if the second rename fails, or Ctrl-C comes between
    them, the old one returns."""
    try:
        if os.path.lexists(folder):
            os.replace(folder, old)
        os.replace(partial, folder)
    except BaseException:
        if not folder.exists() and os.path.lexists(old):
            os.replace(old, folder)
        raise
