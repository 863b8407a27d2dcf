"""Output files that several runs share: whole lines, nothing removed, failures named.

Two pipelines of one Meltano project write the same default dead-letter file; a full
disk or a file size limit must end a run with one line and exit 9, never with half a
line in the file or a STATE past the record whose rejection was not written.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from tests.helpers import (
    DEFAULT_DEAD_LETTERS,
    RECENT,
    TARGET,
    Result,
    dead_letters,
    run_target,
    singer,
    usage,
    wait_until,
)
from tests.platforms import config_for


def rejected_rows(count: int, start: int = 0, blob: int = 0) -> list[dict]:
    """Rows m3ter's rule rejects (no account), optionally carrying ``blob`` bytes each."""
    return [{**row, "account": None, "blob": "x" * blob} for row in usage(count, start=start)]


def clean(result: Result) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.error_lines) <= 1, result.error_lines


def test_a_run_that_rejected_nothing_never_removes_another_runs_dead_letters(sandbox, tmp_path):
    config = config_for("m3ter", sandbox, state_checkpoint_seconds=1, max_rejected_ratio=1)
    config_path = tmp_path / "quiet.json"
    config_path.write_text(json.dumps(config))
    # run B starts first and rejects nothing; it is still running while A rejects 5
    quiet = subprocess.Popen(
        [TARGET, "--config", str(config_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    assert quiet.stdin is not None
    quiet.stdin.write(("\n".join(singer("usage", usage(3), key_properties=["id"])) + "\n").encode())
    quiet.stdin.flush()
    wait_until(lambda: sandbox.stats("m3ter")["stored"] == 3)
    noisy = run_target(tmp_path, config, singer("usage", rejected_rows(5, start=100), key_properties=["id"]))
    assert noisy.returncode == 0, noisy.stderr
    _, err = quiet.communicate(timeout=60)
    assert quiet.returncode == 0, err.decode()
    dead = dead_letters(tmp_path)
    assert sorted(d["record"]["id"] for d in dead) == [100, 101, 102, 103, 104]
    assert len({d["run_id"] for d in dead}) == 1
    assert b"dead letters" not in err


def test_concurrent_runs_append_whole_lines_to_one_dead_letter_file(sandbox, tmp_path):
    config = config_for("m3ter", sandbox, max_rejected_ratio=1)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    runs = []
    for n in range(2):
        # 200 rejections of 40 KB each (far more than one buffered write holds), each
        # after a good row
        bad = rejected_rows(200, start=1000 * n, blob=40_000)
        good = usage(200, start=1000 * n + 500)
        rows = [row for pair in zip(good, bad) for row in pair]
        lines = singer("usage", rows, key_properties=["id"])
        path = tmp_path / f"input-{n}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with open(path, "rb") as stdin:
            runs.append(
                subprocess.Popen(
                    [TARGET, "--config", str(config_path)],
                    stdin=stdin,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    cwd=tmp_path,
                )
            )
    for process in runs:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()[-2000:]
    text = (tmp_path / DEFAULT_DEAD_LETTERS).read_text()
    assert text.endswith("\n")
    dead = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert len(dead) == 400
    by_run: dict[str, set[int]] = {}
    for entry in dead:
        by_run.setdefault(entry["run_id"], set()).add(entry["record"]["id"])
    assert sorted(min(ids) for ids in by_run.values()) == [0, 1000]
    assert all(len(ids) == 200 for ids in by_run.values())


def test_the_same_record_rejected_by_a_later_run_is_recognisable(sandbox, tmp_path):
    config = config_for("m3ter", sandbox, max_rejected_ratio=1)
    rows = [*usage(4), *rejected_rows(1, start=50)]
    for _ in range(2):  # e.g. tap-postgres re-reading its boundary row
        result = run_target(tmp_path, config, singer("usage", rows, key_properties=["id"]))
        assert result.returncode == 0, result.stderr
    first, second = dead_letters(tmp_path)
    assert first["record_id"] == second["record_id"] and first["record_id"]
    assert first["run_id"] != second["run_id"]
    assert first["keys"] == {"id": 50}


def test_a_full_disk_for_dead_letters_is_one_line_exit_9_and_no_state_past_it(sandbox, tmp_path):
    rows = usage(5)
    lines = [
        *singer("usage", rows, key_properties=["id"], state={"p": 1}),
        *singer("usage", rejected_rows(1, start=5), key_properties=["id"])[1:],
        *singer("usage", usage(5, start=6), key_properties=["id"], state={"p": 2})[1:],
    ]
    config = config_for("m3ter", sandbox, dead_letter_path="/dev/full", max_rejected_ratio=1)
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 9, result.stderr
    clean(result)
    (line,) = result.error_lines
    assert "dead_letter_path: cannot write '/dev/full': No space left on device" in line
    assert "stream 'usage', line 8 was not recorded" in line
    assert {"p": 2} not in result.states


def test_a_file_size_limit_mid_line_leaves_only_whole_lines(sandbox, tmp_path):
    limit = 5000  # about two and a half dead-letter lines of 2 KB

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    rows = rejected_rows(6, blob=2000)
    # the limit is for every file of the process: the journal (an SQLite file of pages
    # larger than it) is left out, so that the dead letters meet it
    config = config_for("m3ter", sandbox, max_rejected_ratio=1, journal=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "input.jsonl").write_text("\n".join(singer("usage", rows, state={"p": 1})) + "\n")
    with open(tmp_path / "input.jsonl", "rb") as stdin:
        done = subprocess.run(
            [TARGET, "--config", str(tmp_path / "config.json")],
            stdin=stdin,
            capture_output=True,
            cwd=tmp_path,
            preexec_fn=limit_file_size,  # Python ignores SIGXFSZ: writes past it fail with EFBIG
        )
    result = Result(done.returncode, done.stdout.decode(), done.stderr.decode())
    assert result.returncode == 9, result.stderr
    clean(result)
    assert "dead_letter_path: cannot write" in result.error_lines[0]
    text = (tmp_path / DEFAULT_DEAD_LETTERS).read_text()
    assert text.endswith("\n") and len(text) <= limit
    kept = [json.loads(line) for line in text.splitlines()]
    assert [d["record"]["id"] for d in kept] == [0, 1]
    assert result.states == []


def test_a_full_disk_for_a_dry_run_names_dry_run_path(tmp_path):
    config = {
        "destination": "m3ter",
        "dry_run": True,
        "dry_run_path": "/dev/full",
        "progress_interval_seconds": 0,
        "mappings": [
            {
                "stream": "usage",
                "fields": {"meter": "'m'", "account": "account", "ts": "at", "measure": {"t": "tokens"}},
            }
        ],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    lines = "\n".join(singer("usage", usage(3), key_properties=["id"])) + "\n"
    done = subprocess.run(
        [TARGET, "--config", str(tmp_path / "config.json")],
        input=lines.encode(),
        capture_output=True,
        cwd=tmp_path,
    )
    result = Result(done.returncode, done.stdout.decode(), done.stderr.decode())
    assert result.returncode == 9, result.stderr
    clean(result)
    assert "dry_run_path: cannot write '/dev/full': No space left on device" in result.error_lines[0]
    assert "unexpected error" not in result.stderr


def test_no_dead_letter_file_appears_when_nothing_is_rejected_and_an_empty_one_is_kept(sandbox, tmp_path):
    config = config_for("m3ter", sandbox)
    assert run_target(tmp_path, config, singer("usage", usage(3))).returncode == 0
    assert not (tmp_path / DEFAULT_DEAD_LETTERS).exists()
    (tmp_path / DEFAULT_DEAD_LETTERS).write_text("")  # another run's, or the operator's
    assert run_target(tmp_path, config, singer("usage", usage(3))).returncode == 0
    assert (tmp_path / DEFAULT_DEAD_LETTERS).exists()


assert sys.platform != "win32" and RECENT  # flock, RLIMIT_FSIZE and /dev/full: POSIX
