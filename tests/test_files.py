"""Outputs never half-written, never over a folder of files without --force (tinyavl/files.py), and the
toy trainer's command line refusing, before any training, to replace a model folder it was not asked to."""
import errno
import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest

from tinyavl import files as files_module
from tinyavl.cli import TOY_WEIGHTS
from tinyavl.errors import UserError
from tinyavl.files import (check_new_folder, check_output_file, check_picture_folder, read_json_object,
                           write_file_atomically, write_folder_atomically)
from tinyavl.toy import train

IMAGE = TOY_WEIGHTS / "examples" / "scene-0.png"


def digest(folder: Path) -> dict:
    """relative path -> sha256 of every file under folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fail_midway(partial: Path) -> None:
    (partial / "model.safetensors").write_text("half")
    raise RuntimeError("disk full")


def test_a_failed_file_write_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "map.png"
    path.write_text("old")
    with pytest.raises(ZeroDivisionError):
        write_file_atomically(path, lambda partial: (partial.write_text("half"), 1 / 0))  # fails midway
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]
    write_file_atomically(path, lambda partial: partial.write_text("new"), replace=True)
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]


def recording_syncs(monkeypatch, events: list) -> None:
    """os.fsync, os.replace and os.link log ("sync", path) / ("rename", destination) into events, in order."""
    fsync, replace, link = os.fsync, os.replace, os.link

    def synced(descriptor):
        events.append(("sync", os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    def renamed(rename):
        def logged(source, destination, *args, **kwargs):
            rename(source, destination, *args, **kwargs)
            events.append(("rename", str(destination)))
        return logged

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", renamed(replace))
    monkeypatch.setattr(os, "link", renamed(link))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an open file by /proc/self/fd")
@pytest.mark.parametrize("replace", [False, True])
def test_a_written_file_is_on_the_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch, replace):
    """Otherwise a power cut soon after could leave the name on the disk and not the bytes it names: an empty
    file where the old one or none was."""
    events = []
    recording_syncs(monkeypatch, events)
    path = tmp_path / "map.png"
    write_file_atomically(path, lambda partial: partial.write_text("new"), replace=replace)
    (kind, synced), rename, folder = events
    assert kind == "sync" and Path(synced).parent == tmp_path and synced.endswith(".partial")
    assert rename == ("rename", str(path)) and folder == ("sync", str(tmp_path))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an open file by /proc/self/fd")
def test_a_written_folder_is_on_the_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    """A trainer deletes its checkpoint once its folder is written: the folder must be on the disk by then."""
    events = []
    recording_syncs(monkeypatch, events)
    out = tmp_path / "toy"

    def write(partial):
        (partial / "examples").mkdir()
        (partial / "config.json").write_text("{}")
        (partial / "examples" / "scene-0.png").write_text("png")

    write_folder_atomically(out, write)
    *synced, rename, folder = events
    names = [Path(path).relative_to(Path(synced[-1][1])) for _, path in synced[:-1]]   # inside the partial folder
    assert sorted(map(str, names)) == ["config.json", "examples", "examples/scene-0.png"]
    assert synced[-1][1].endswith(".partial") and rename == ("rename", str(out)) and folder == ("sync", str(tmp_path))


def test_a_file_made_during_the_work_is_kept_unless_replace(tmp_path):
    """The command checked that the name was free before its minutes of work; a file (or a link to nowhere)
    the user made there meanwhile stays as it is, and nothing else is left behind. With replace (--force)
    the output takes its place."""
    path = tmp_path / "map.png"

    def user_makes(make):
        def write(partial):
            partial.write_text("new")
            make()
        return write

    for make in (lambda: path.write_text("the user's"), lambda: path.symlink_to(tmp_path / "nowhere.png")):
        with pytest.raises(UserError, match="appeared while this command ran"):
            write_file_atomically(path, user_makes(make))
        assert os.path.lexists(path) and sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]
        if path.is_symlink():
            assert os.readlink(path) == str(tmp_path / "nowhere.png")
        else:
            assert path.read_text() == "the user's"
        path.unlink()
    write_file_atomically(path, lambda partial: partial.write_text("new"))
    assert path.read_text() == "new"
    write_file_atomically(path, lambda partial: partial.write_text("newer"), replace=True)
    assert path.read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]


def test_a_folder_removed_during_the_work_is_one_line(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()

    def write(partial):
        partial.write_text("new")
        shutil.rmtree(folder)

    with pytest.raises(UserError, match="was removed while this command ran"):
        write_file_atomically(folder / "map.png", write)


@pytest.mark.parametrize("refusal", [FileNotFoundError(errno.ENOENT, "No such file or directory"),
                                     PermissionError(errno.EACCES, "Permission denied")])
def test_a_folder_that_refuses_the_temporary_file_names_the_output(tmp_path, refusal):
    """A folder that looks writable but refuses new files (/proc, /sys as root): the error names the file
    the user asked for, not the write's hidden temporary name."""
    path = tmp_path / "map.png"

    def refused(partial):
        refusal.filename = str(partial)
        raise refusal

    with pytest.raises((UserError, PermissionError)) as info:
        write_file_atomically(path, refused)
    assert str(path) in str(info.value) and ".partial" not in str(info.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("refusal", [FileNotFoundError(errno.ENOENT, "No such file or directory"),
                                     PermissionError(errno.EACCES, "Permission denied")])
def test_a_place_that_refuses_the_temporary_folder_names_the_output(tmp_path, monkeypatch, refusal):
    mkdir = Path.mkdir

    def refusing(self, *args, **kwargs):
        if self.name.endswith(".partial"):
            refusal.filename = str(self)
            raise refusal
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refusing)
    with pytest.raises((UserError, PermissionError)) as info:
        write_folder_atomically(tmp_path / "model", lambda partial: (partial / "x").write_text("1"))
    assert str(tmp_path / "model") in str(info.value) and ".partial" not in str(info.value)
    assert not list(tmp_path.iterdir())


def test_a_file_write_the_system_refuses_leaves_nothing(tmp_path):
    """A name as long as names go (its temporary name must not be longer), and a full disk."""
    path = tmp_path / ("m" * 251 + ".png")
    write_file_atomically(path, lambda partial: partial.write_text("new"))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    def disk_full(partial):
        partial.write_text("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left") as error:
        write_file_atomically(path, disk_full)
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert error.value.filename == str(path)  # the one line a command prints names the output
    with pytest.raises(OSError) as error:
        write_folder_atomically(tmp_path / "model", lambda partial: disk_full(partial / "config.json"))
    assert error.value.filename == str(tmp_path / "model") and error.value.errno == 28


def test_a_folder_of_files_is_replaced_only_with_force_and_never_half(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    before = digest(out)
    with pytest.raises(UserError, match="--force"):
        write_folder_atomically(out, lambda partial: (partial / "config.json").write_text("new"))
    with pytest.raises(RuntimeError, match="disk full"):
        write_folder_atomically(out, fail_midway, replace=True)
    assert digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    write_folder_atomically(out, lambda partial: (partial / "weights.txt").write_text("new"), replace=True)
    assert digest(out).keys() == {"weights.txt"} and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # A new folder, parents included, and an empty one need no force.
    write_folder_atomically(tmp_path / "a" / "b", lambda partial: (partial / "x").write_text("1"))
    (tmp_path / "empty").mkdir()
    check_new_folder(tmp_path / "empty", replace=False)
    with pytest.raises(UserError, match="is a file"):
        check_new_folder(out / "weights.txt", replace=True)


@pytest.mark.parametrize("argv", [["--steps", "1"], ["--steps", "1", "--out", str(TOY_WEIGHTS)]])
def test_toy_trainer_refuses_to_replace_the_committed_model(argv, capsys, monkeypatch):
    """The default --out is the committed weights/toy: without --force the command exits 2 at once,
    before training (train is never called), and the folder is byte for byte what it was."""
    before = digest(TOY_WEIGHTS)
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("trained before checking --out"))
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--force" in err
    assert digest(TOY_WEIGHTS) == before


def test_a_folder_write_touches_no_other_folder_and_checks_its_parent_first(tmp_path):
    """Folders that happen to be called like a write's temporary names stay; a parent that is a file, or
    an --out that holds an input, is refused before any work."""
    for name in (".model.partial", ".model.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text("the user's")
    write_folder_atomically(tmp_path / "model", lambda partial: (partial / "x").write_text("1"))
    write_folder_atomically(tmp_path / "model", lambda partial: (partial / "x").write_text("2"), replace=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.old", ".model.partial", "model"]
    assert all((tmp_path / name / "keep.txt").read_text() == "the user's" for name in (".model.partial", ".model.old"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="a-file is a file"):
        check_new_folder(tmp_path / "a-file" / "model", replace=False)
    with pytest.raises(UserError, match="would replace a folder that holds the input"):
        check_new_folder(tmp_path, replace=True, inputs=[tmp_path / "model"])


@pytest.mark.parametrize("argv,named", [(["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"),
                                        (["--eval-every", "-1"], "--eval-every"), (["--threads", "0"], "--threads"),
                                        (["--threads", "1000000"], "--threads"),
                                        (["--seed", str(2 ** 64)], "--seed"), (["--seed", str(-2 ** 63 - 1)], "--seed")])
def test_toy_trainer_refuses_a_bad_schedule_before_training(argv, named, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(SystemExit) as exit_:
        train.main(["--out", str(tmp_path / "toy"), *argv])
    assert exit_.value.code == 2 and named in capsys.readouterr().err


def test_an_output_folder_that_only_receives_files_may_hold_an_input(tmp_path):
    from tinyavl.files import check_apart_from_inputs
    model = tmp_path / "weights" / "toy"
    model.mkdir(parents=True)
    check_apart_from_inputs(tmp_path, "--attention-maps", inputs=[model])   # pictures beside weights/: fine
    with pytest.raises(UserError, match="would replace a folder that holds the input"):
        check_apart_from_inputs(tmp_path, "--out", inputs=[model], replaced_whole=True)
    with pytest.raises(UserError, match="would overwrite the input"):
        check_apart_from_inputs(model, "--out", inputs=[model])
    with pytest.raises(UserError, match="lies inside the input folder"):
        check_apart_from_inputs(model / "maps", "--attention-maps", inputs=[model])
    # Deeper down too, where no entry of the input folder is the path or above it.
    with pytest.raises(UserError, match=f"lies inside the input folder {re.escape(str(model.resolve()))}"):
        check_apart_from_inputs(model / "maps" / "layer-2" / "map.png", "--attention-map", inputs=[model])


def test_each_write_takes_a_temporary_name_of_its_own(tmp_path):
    """Two writes of one output (two runs at once) must not share a temporary file: hidden, beside the
    output, and drawn anew each time."""
    from tinyavl.files import temporary_beside
    path = tmp_path / "map.png"
    names = {temporary_beside(path, "partial") for _ in range(20)}
    assert len(names) == 20
    assert all(name.parent == tmp_path and name.name.startswith(".map.png.") and name.suffix == ".partial"
               for name in names)


def test_an_input_folder_of_links_protects_the_files_they_lead_to(tmp_path):
    """A model folder of links (the Hugging Face cache's layout, or cp -rs): the folder that holds the files
    they lead to is an input too, which --force replaced before (train_hires --base links --out real)."""
    from tinyavl.files import check_apart_from_inputs
    real, links = tmp_path / "real", tmp_path / "links"
    real.mkdir()
    links.mkdir()
    for name in ("config.json", "model.safetensors"):
        (real / name).write_text(name)
        (links / name).symlink_to(real / name)
    with pytest.raises(UserError, match=f"would replace a folder that holds the input {re.escape(str(real))}"):
        check_apart_from_inputs(real, "--out", inputs=[links], replaced_whole=True)
    with pytest.raises(UserError, match="would overwrite the input"):
        check_apart_from_inputs(real / "model.safetensors", "--checkpoint", inputs=[links])
    check_apart_from_inputs(tmp_path / "elsewhere", "--out", inputs=[links], replaced_whole=True)   # fine
    # A stray loop of links in the folder, which loading never opens, blocks no output.
    (links / "stale").symlink_to(links / "stale")
    check_apart_from_inputs(tmp_path / "elsewhere", "--out", inputs=[links], replaced_whole=True)
    with pytest.raises(UserError, match="would replace a folder that holds the input"):
        check_apart_from_inputs(real, "--out", inputs=[links], replaced_whole=True)


def test_a_folder_write_that_fails_at_its_last_rename_keeps_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    real_replace = os.replace

    def replace(src, dst):  # the rename of the new folder into place fails, as on a full disk
        if Path(src).name.endswith(".partial"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        write_folder_atomically(out, lambda partial: (partial / "config.json").write_text("new"), replace=True)
    assert (out / "config.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_the_current_folder_or_one_above_it_is_no_output_folder(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for folder in (Path("."), Path(".."), tmp_path):
        with pytest.raises(UserError, match="current folder"):
            check_new_folder(folder, replace=True)


def test_a_linked_output_folder_is_replaced_without_leaving_the_link_behind(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    write_folder_atomically(tmp_path / "link", lambda partial: (partial / "x").write_text("1"), replace=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"] and (tmp_path / "link" / "x").exists()


def test_a_new_folder_is_checked_where_its_temporary_folders_go(tmp_path, monkeypatch):
    """The write makes its temporary folders beside the folder as named, so that folder's parent must be
    writable, not the parent of where a link leads: ro/out -> rw/target with ro read-only is refused
    (permissions as a user without root would see them, here by os.access)."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw").mkdir()
    (tmp_path / "ro" / "out").symlink_to(tmp_path / "rw" / "target")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "ro" and real_access(path, mode))
    with pytest.raises(UserError, match="cannot be written to"):
        check_new_folder(tmp_path / "ro" / "out", replace=True)                # a link: replaced only with --force
    check_new_folder(tmp_path / "rw" / "target", replace=False)


def test_ctrl_c_between_the_two_renames_brings_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    real_replace = os.replace

    def replace(src, dst):  # Ctrl-C right after the old folder was moved out of the way
        real_replace(src, dst)
        if Path(dst).name.endswith(".old"):
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(out, lambda partial: (partial / "config.json").write_text("new"), replace=True)
    assert (out / "config.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("appears", ["a folder of files", "a file", "a link"])
def test_a_folder_that_appears_during_the_work_is_kept_without_force(tmp_path, appears):
    """Without --force, what appears at the output's name while the folder is written (after the command's
    check) stays, whole, and the write ends in one line: one rename, which takes a free name or an empty
    folder and nothing else. (It was moved aside and deleted.)"""
    out = tmp_path / "model"

    def write_while_the_user_makes_it(partial):
        (partial / "config.json").write_text("new")
        if appears == "a folder of files":
            out.mkdir()
            (out / "mine.txt").write_text("the user's")
        elif appears == "a file":
            out.write_text("the user's")
        else:
            out.symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match="appeared or filled while this command ran: it was kept"):
        write_folder_atomically(out, write_while_the_user_makes_it)
    kept = {"a folder of files": lambda: (out / "mine.txt").read_text() == "the user's",
            "a file": lambda: out.read_text() == "the user's",
            "a link": lambda: os.readlink(out) == str(tmp_path / "nowhere")}[appears]
    assert kept() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    (tmp_path / "empty").mkdir()                                               # an empty folder is taken
    write_folder_atomically(tmp_path / "empty", lambda partial: (partial / "x").write_text("1"))
    assert (tmp_path / "empty" / "x").read_text() == "1"


def test_a_rename_the_system_refuses_is_not_called_a_folder_that_appeared(tmp_path, monkeypatch):
    """Only the refusals of a taken name (a folder that filled, a file, a link) say that something appeared; any
    other error of the rename (here an I/O error) stays the system's, for the command's one line, and no
    temporary folder is left."""
    def refuse(src, dst):
        raise OSError(errno.EIO, "Input/output error", str(dst))
    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError) as refused:
        write_folder_atomically(tmp_path / "model", lambda partial: (partial / "x").write_text("1"))
    assert refused.type is OSError and refused.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []


def test_a_link_named_as_the_output_folder_needs_force_even_to_nothing(tmp_path):
    """A link is a name the user made, leading to an empty folder or to nothing: refused without --force (a
    link to nothing passed as no folder at all, and was replaced); with it, the link goes, what it leads to
    stays."""
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "nowhere"):
        link = tmp_path / f"to-{target.name}"
        link.symlink_to(target)
        with pytest.raises(UserError, match="is a link: give another folder, or --force to replace the link"):
            check_new_folder(link, replace=False)
        write_folder_atomically(link, lambda partial: (partial / "x").write_text("1"), replace=True)
        assert not link.is_symlink() and (link / "x").read_text() == "1"
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_a_file_replaced_with_force_keeps_its_permissions(tmp_path):
    path = tmp_path / "private.png"
    path.write_text("old")
    path.chmod(0o600)
    write_file_atomically(path, lambda partial: partial.write_text("new"), replace=True)
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o600


def test_the_folders_made_above_a_new_folder_reach_the_disk_too(tmp_path, monkeypatch):
    """--out a/b/model with a and b new: mkdir makes them, and each one's name is synced in its parent (the
    folder tmp holds a, a holds b), as the new folder's is in b: a power cut after the write leaves it."""
    synced = []
    real_to_disk = files_module.to_disk
    monkeypatch.setattr(files_module, "to_disk", lambda path: (synced.append(Path(path)), real_to_disk(path)))
    write_folder_atomically(tmp_path / "a" / "b" / "model", lambda partial: (partial / "x").write_text("1"))
    assert {tmp_path, tmp_path / "a", tmp_path / "a" / "b"} <= set(synced)


def test_ctrl_c_after_the_new_folder_took_its_name_leaves_no_old_copy(tmp_path, monkeypatch):
    """A Ctrl-C after the second rename (here while the new name is synced): the new folder stays, and the
    old one is not left behind under a hidden name."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    real_to_disk = files_module.to_disk

    def interrupted(path):
        if Path(path) == tmp_path:
            raise KeyboardInterrupt
        real_to_disk(path)
    monkeypatch.setattr(files_module, "to_disk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(out, lambda partial: (partial / "config.json").write_text("new"), replace=True)
    assert (out / "config.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("refusal", [errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS],
                         ids=["EPERM", "EOPNOTSUPP", "ENOSYS"])
def test_without_hard_links_a_new_file_is_still_written_and_an_existing_one_kept(tmp_path, monkeypatch, refusal):
    """Some file systems refuse hard links (FAT: EPERM; others EOPNOTSUPP, some FUSE ones ENOSYS): the write then checks the name and
    renames."""
    def no_links(src, dst):
        raise OSError(refusal, os.strerror(refusal))
    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "map.png"
    write_file_atomically(path, lambda partial: partial.write_text("new"))
    assert path.read_text() == "new"
    with pytest.raises(UserError, match="appeared while this command ran"):
        write_file_atomically(path, lambda partial: partial.write_text("newer"))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]



def test_a_pictures_folder_that_holds_them_is_refused_but_with_force(tmp_path):
    (tmp_path / "caption.png").write_bytes(b"the user's")
    with pytest.raises(UserError, match="caption.png already exists: give another name, or --force"):
        check_picture_folder(tmp_path, "--attention-maps", ["caption.png"], inputs=[])
    check_picture_folder(tmp_path, "--attention-maps", ["caption.png"], inputs=[], replace=True)


def test_an_output_under_a_link_to_nothing_is_refused_before_the_work(tmp_path):
    """exists() follows a link: one to nothing looked like a folder still to be made, and the write (after
    an hour of training) failed on it with a traceback."""
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    gone = re.escape(str(tmp_path / "gone"))
    with pytest.raises(UserError, match=f"cannot be made: {gone} is a link to nothing"):
        check_new_folder(tmp_path / "gone" / "sub" / "model", replace=False)
    with pytest.raises(UserError, match="is a link to nothing: give a folder"):
        check_picture_folder(tmp_path / "gone", "--attention-maps", ["a.png"], inputs=[])
    with pytest.raises(UserError, match="cannot be made: .* is a link to nothing"):
        check_picture_folder(tmp_path / "gone" / "maps", "--attention-maps", ["a.png"], inputs=[])
    assert not (tmp_path / "nowhere").exists()


def test_an_output_under_a_file_says_the_parent_is_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's")
    with pytest.raises(UserError, match="notes.txt is a file, not a folder"):
        check_output_file(tmp_path / "notes.txt" / "map.png", "--attention-map", inputs=[])


@pytest.mark.parametrize("name, said", [("map.txt", "give it a .png, "), ("map", "give it a .png, "),
                                         (".png", "the name is a suffix alone: give it a name before .png"),
                                         (".JPG", "the name is a suffix alone: give it a name before .JPG")])
def test_an_output_picture_needs_a_name_and_a_picture_suffix(tmp_path, name, said):
    """A name that starts with a dot is all stem (Path(".png").suffix is ""): said as a name that is missing."""
    with pytest.raises(UserError, match=re.escape(f"--attention-map {tmp_path / name}: {said}")):
        check_output_file(tmp_path / name, "--attention-map", inputs=[])


def test_a_missing_file_inside_the_write_is_a_bug_with_its_traceback(tmp_path):
    """Only a destination folder removed during the work is the user's doing; any other missing file is not."""
    with pytest.raises(FileNotFoundError):
        write_file_atomically(tmp_path / "map.png", lambda partial: open(tmp_path / "fonts" / "sans.ttf"))
    assert list(tmp_path.iterdir()) == []


def test_an_error_that_names_its_own_file_keeps_that_name(tmp_path):
    def write(partial):
        raise OSError(errno.EIO, "Input/output error", "/data/fonts/sans.ttf")
    with pytest.raises(OSError) as error:
        write_file_atomically(tmp_path / "map.png", write)
    assert error.value.filename == "/data/fonts/sans.ttf"


def test_json_nested_too_deep_is_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="is not valid JSON"):
        read_json_object(path)


def test_an_output_where_this_user_cannot_write_is_refused_before_the_work(tmp_path, monkeypatch):
    """As root every folder is writable: os.access is made to answer as for a user without the right."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw").mkdir()
    (tmp_path / "rw" / "map.png").write_text("read-only file")
    real_access = os.access
    denied = {tmp_path / "ro", tmp_path / "rw" / "map.png"}
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) not in denied and real_access(path, mode))
    for out in (tmp_path / "ro" / "map.png", tmp_path / "rw" / "map.png"):
        with pytest.raises(UserError, match="cannot write there"):
            check_output_file(out, "--attention-map", inputs=[], replace=True)


def test_a_loop_of_links_is_one_line(tmp_path):
    """Python 3.11's Path.resolve raises RuntimeError on a loop (3.13: OSError ELOOP)."""
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(UserError):
        check_output_file(loop, "--attention-map", inputs=[IMAGE], replace=True)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EBADF, errno.ENOTSUP])
def test_a_folder_the_system_cannot_sync_is_left_as_it_is_but_not_a_file(tmp_path, monkeypatch, code):
    """Some file systems refuse fsync on a folder (EINVAL, EBADF, ENOTSUP): the write goes on. The same refusal
    for a file's bytes, or another error for a folder (EIO: the disk failed), stops it."""
    folder, file = tmp_path / "out", tmp_path / "out.txt"
    folder.mkdir()
    file.write_text("answer")
    errors = {folder.resolve(): code, file.resolve(): code}

    def refusing(descriptor):  # the path the descriptor was opened on, as Linux names it
        path = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
        raise OSError(errors[path], os.strerror(errors[path]))

    monkeypatch.setattr(os, "fsync", refusing)
    files_module.to_disk(folder)
    with pytest.raises(OSError):
        files_module.to_disk(file)
    errors[folder.resolve()] = errno.EIO
    with pytest.raises(OSError):
        files_module.to_disk(folder)
