"""ktg_ensemble.py's search across machines, on a real PostgreSQL server started for
these tests: three workers share one study by URL, one killed and resumed; a
server lost mid-search; the one line a connection failure gives."""
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest

import ktg_ensemble
from common.launch import UserError
from conftest import ROOT, free_port, results, run_main, wait_for

SEARCH = ["--nodes", "resnet8_abn", "resnet8_abn", "--epochs", "2", "--train-subset", "200", "--batch-size", "50",
          "--search", "4", "--heartbeat-grace", "3"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # three workers on two cores: no oversubscription


def postgres_bin():
    """The folder of initdb and pg_ctl: from PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    folders = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    return folders[-1] if folders else None


class Server:
    """A throwaway PostgreSQL server in `folder`, on 127.0.0.1:`port`. Root may not
    run it: then its programs run as the postgres user."""

    def __init__(self, folder, port):
        self.folder, self.port, self.bin = folder, port, postgres_bin()

    def run(self, program, *args, check=True):
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_postgres, self.bin / program, *map(str, args)], check=check, capture_output=True)

    def start(self):
        self.run("pg_ctl", "-D", self.folder / "data", "-l", self.folder / "log", "-w", "start",
                 "-o", f"-h 127.0.0.1 -p {self.port} -k {self.folder}")

    def stop(self):
        self.run("pg_ctl", "-D", self.folder / "data", "-m", "fast", "-w", "stop")

    def url(self, database="ktg", user="postgres", password=None, port=None):
        login = f"{user}:{password}" if password else user
        return f"postgresql+psycopg://{login}@127.0.0.1:{port or self.port}/{database}"


@pytest.fixture(scope="module")
def postgres_server():
    """A server with the database `ktg`: the user postgres enters without a password,
    the user alice only with the password 'secret'."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (no initdb, pg_ctl)")
    if os.geteuid() == 0 and "postgres" not in {user.pw_name for user in pwd.getpwall()}:
        pytest.skip("running as root, and no postgres user to run the server as")
    # Not under pytest's tmp_path: the postgres user must be able to reach the folder.
    folder = Path(tempfile.mkdtemp(prefix="ktg-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    server = Server(folder, free_port())
    try:
        server.run("initdb", "-D", folder / "data", "-U", "postgres", "-A", "trust", "--no-sync")
        (folder / "data" / "pg_hba.conf").write_text("local all all trust\n"
                                                     "host all alice 127.0.0.1/32 scram-sha-256\n"
                                                     "host all all 127.0.0.1/32 trust\n")
        server.start()
        server.run("psql", "-h", "127.0.0.1", "-p", server.port, "-U", "postgres", "-c",
                   "CREATE ROLE alice LOGIN PASSWORD 'secret'", "-c", "CREATE DATABASE ktg")
        yield server
    finally:
        server.run("pg_ctl", "-D", folder / "data", "-m", "immediate", "stop", check=False)  # if it started
        shutil.rmtree(folder)


@pytest.fixture(scope="module")
def postgres_url(postgres_server):
    """The URL of the throwaway server's database `ktg`."""
    return postgres_server.url()


def study_trials(storage, name):
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    except KeyError:  # no study yet
        return []


def finished(trials):
    return {t.number: t.state.name for t in trials if t.state.name in ("COMPLETE", "PRUNED")}


def start_worker(storage, study, seed, out, *flags):
    """One search worker, as the README starts it on each machine."""
    return subprocess.Popen([sys.executable, "ktg_ensemble.py", *SEARCH, "--storage", storage, "--study-name", study,
                             "--seed", str(seed), "--out", str(out), *flags],
                            cwd=ROOT, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_three_workers_share_one_study_through_a_kill(tmp_path, postgres_url):
    # twice as many trials as workers, so that worker 2 surely starts a trial after another has finished
    more = ("--search", "6")
    workers = [start_worker(postgres_url, "three", seed, tmp_path / f"worker{seed}", *more) for seed in range(3)]
    victim, running = workers[2], []

    def victim_inside_a_trial():
        trials = study_trials(postgres_url, "three")
        running[:] = [t.number for t in trials
                      if t.state.name == "RUNNING" and t.user_attrs.get("worker", "").endswith(f":{victim.pid}")]
        return finished(trials) and running

    try:
        try:
            wait_for(victim_inside_a_trial, "worker 2 inside a trial after a finished one", process=victim)
        finally:
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
        killed_trial, = running
        before = finished(study_trials(postgres_url, "three"))
        workers[2] = start_worker(postgres_url, "three", 2, tmp_path / "worker2", *more, "--resume")
        for worker in workers:
            _, stderr = worker.communicate(timeout=120)
            assert worker.returncode == 0, stderr[-2000:]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()

    trials = study_trials(postgres_url, "three")
    after = finished(trials)
    assert len(after) >= 6 and {number: after.get(number) for number in before} == before  # none lost
    assert not any(t.state.name == "RUNNING" for t in trials)
    assert trials[killed_trial].state.name == "FAIL"
    best = [results(tmp_path / f"worker{seed}")["search"]["best_graph"] for seed in range(3)]
    assert best[0] == best[1] == best[2]
    assert all((tmp_path / f"worker{seed}" / "best_graph.json").read_text() ==
               (tmp_path / "worker0" / "best_graph.json").read_text() for seed in range(3))


def test_a_lost_server_stops_the_worker_with_one_line(tmp_path, postgres_server):
    storage, out = postgres_server.url(), tmp_path / "worker"
    worker = start_worker(storage, "lost", 0, out)
    try:
        wait_for(lambda: any(t.state.name == "RUNNING" for t in study_trials(storage, "lost")),
                 "a trial", process=worker)
        postgres_server.stop()
        _, stderr = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
        postgres_server.start()
    assert worker.returncode == 2 and "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(rf"error: lost the study storage at 127\.0\.0\.1:{postgres_server.port}: "
                                             r".+; rerun with --resume once it is back", errors[0]), stderr[-2000:]
    _, stderr = start_worker(storage, "lost", 0, out, "--resume").communicate(timeout=300)
    assert (out / "results.json").is_file(), stderr[-2000:]
    trials = study_trials(storage, "lost")
    assert len(finished(trials)) >= 4 and not any(t.state.name == "RUNNING" for t in trials)
    assert [t.state.name for t in trials].count("FAIL") == 1  # the trial the stop interrupted


@pytest.mark.parametrize("failure, message", [
    ("server down", r"at 127\.0\.0\.1:\d+: connection refused \(is the server running\?\)$"),
    ("wrong password", r"at 127\.0\.0\.1:\d+: password authentication failed for user \"alice\""),
    ("no such database", r"at 127\.0\.0\.1:\d+: database \"nowhere\" does not exist$"),
], ids=["server down", "wrong password", "no such database"])
def test_connection_failures_are_one_line(tmp_path, postgres_server, failure, message):
    storage = {"server down": postgres_server.url(port=free_port()),
               "wrong password": postgres_server.url(user="alice", password="not-this-one"),
               "no such database": postgres_server.url(database="nowhere")}[failure]
    with pytest.raises(UserError, match="^cannot reach the study storage " + message) as error:
        run_main(ktg_ensemble, *SEARCH, "--storage", storage, "--out", tmp_path / "run")
    assert "not-this-one" not in str(error.value)  # the password is never shown


def test_the_password_is_masked_in_other_errors(tmp_path):
    with pytest.raises(UserError, match=r"in postgresql\+typo://alice:\*\*\*@db\.example:5432/ktg: ") as error:
        run_main(ktg_ensemble, *SEARCH, "--storage", "postgresql+typo://alice:secret@db.example:5432/ktg",
                 "--out", tmp_path / "run")
    assert "secret" not in str(error.value)
