"""The Optuna study a Knowledge Transfer Graph search (ktg_ensemble.py) keeps its
trials in: opened on SQLite or a shared PostgreSQL server with heartbeats, its
trials run until the study has enough (a lost server in one line, the wait for
other workers' trials), its best trial, and what a worker writes of it
(trials.csv, search.png)."""
import fcntl
import logging
import os
import warnings

from common.launch import UserError


def open_study(args, out):
    """The Optuna study in --storage (created if new), with the authors' random
    sampler and successive-halving pruner, and its storage. Heartbeats let a later
    worker mark the trial of a killed process as failed."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, QuietInterrupt) for f in trials_log.filters):
        trials_log.addFilter(QuietInterrupt())
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = storage_url(args, out)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    # Workers starting together on a new SQLite file race to create its tables:
    # they take turns, through a lock file beside it.
    lock_path = url.removeprefix("sqlite:///") + ".lock" if url.startswith("sqlite:///") else os.devnull
    try:
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # a trial beats three times per grace period: one late beat does not fail it
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine,
                                                 heartbeat_interval=max(1, args.heartbeat_grace // 3),
                                                 grace_period=args.heartbeat_grace)
            study = optuna.create_study(storage=storage, study_name=args.study_name, direction="minimize",
                                        load_if_exists=True)
    except Exception as error:  # a bad URL, an unreachable server, a missing folder
        failure = storage_failure(error, url)
        if failure:
            raise UserError(f"cannot reach the study storage at {failure}") from None
        raise UserError(f"cannot open study {args.study_name!r} in {masked(url)}: {type(error).__name__}: "
                        f"{str(error).splitlines()[0]}") from None
    # one validation split for the whole study: every worker ranks its trials on the same images
    split = {"fraction": args.val_split, "seed": args.split_seed}
    if "val_split" not in study.user_attrs:
        study.set_user_attr("val_split", split)
    elif study.user_attrs["val_split"] != split:
        first = study.user_attrs["val_split"]
        raise UserError(f"study {args.study_name!r} scores on --val-split {first['fraction']} --split-seed "
                        f"{first['seed']}: give this worker the same, not {args.val_split} and {args.split_seed}")
    # Seeded by the trials already there: one worker is reproducible, a resumed one draws new graphs.
    study.sampler = optuna.samplers.RandomSampler(seed=args.seed * 100_003 + len(study.trials))
    study.pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    return study, storage


def run_trials(study, storage, objective, count, url):
    """Run `objective` in trials until `count` trials of the study have finished
    (completed or pruned, by any worker), wait for the other workers' running
    trials, and return all trials. A trial whose loss turns NaN (a UserError)
    fails alone and the search goes on.

    A lost server stops the worker with one line, not Optuna's and SQLAlchemy's
    tracebacks. The heartbeat thread, which usually meets it first, interrupts
    the training instead of dying alone. The trial left RUNNING fails once the
    server is back and its heartbeat is stale."""
    import _thread
    import threading

    import optuna
    from optuna.trial import TrialState

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    lost, default_hook = [], threading.excepthook

    def on_thread_error(hook_args):
        if storage_failure(hook_args.exc_value, url):
            lost.append(hook_args.exc_value)
            _thread.interrupt_main()
        else:
            default_hook(hook_args)

    threading.excepthook = on_thread_error
    try:
        if len(study.get_trials(deepcopy=False, states=finished)) < count:
            study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(count, states=finished)],
                           catch=(UserError,))
        # Other workers' last trials may still beat the best: wait until none runs,
        # so that every worker retrains the same graph.
        return wait_for_running_trials(study, storage)
    except (Exception, KeyboardInterrupt) as error:
        failure = storage_failure(lost[0] if lost else error, url)
        if not failure:
            raise
        raise UserError(f"lost the study storage at {failure}; rerun with --resume once it is back") from None
    finally:
        threading.excepthook = default_hook


def best_trial(trials, args):
    """The completed trial of least validation error (as study.best_trial, without
    asking the server again), and the search's summary for results.json."""
    from optuna.trial import TrialState

    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if not completed:
        raise UserError(f"no trial of study {args.study_name!r} completed")
    best = min(completed, key=lambda t: t.value)
    summary = {"study_name": args.study_name, "trials": len(trials), "completed": len(completed),
               "pruned": sum(t.state == TrialState.PRUNED for t in trials),
               "failed": sum(t.state == TrialState.FAIL for t in trials),
               "best_trial": best.number, "best_val_error": best.value, "best_graph": best.user_attrs["graph"],
               "val_split": args.val_split, "val_split_seed": args.split_seed}
    return best, summary


def wait_for_running_trials(study, storage):
    """Return every trial of the study once none is running, on two reads a second
    apart (a worker between its count and its next trial shows on the second).

    A killed worker's trial stays RUNNING until its last heartbeat is older than
    the grace period; then it fails. Optuna never counts as stale a trial that has
    no heartbeat at all (its worker died between creating it and its first beat):
    each running trial gets one beat here when first seen, so that it goes stale
    a grace period later unless its own worker keeps beating."""
    import time

    import optuna
    from optuna.trial import TrialState

    beaten, quiet_reads = set(), 0
    while True:
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials()
        running = [t for t in trials if t.state == TrialState.RUNNING]
        for trial in running:
            if trial._trial_id not in beaten:
                storage.record_heartbeat(trial._trial_id)
                beaten.add(trial._trial_id)
        quiet_reads = 0 if running else quiet_reads + 1
        if quiet_reads == 2:
            return trials
        time.sleep(1)


class QuietInterrupt(logging.Filter):
    """Optuna logs a trial's error with its traceback: none for Ctrl-C or SIGTERM (the
    script's one line says it) and none for a UserError (a trial whose loss turned NaN)."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, UserError):
            record.exc_info = None
        return not isinstance(error, KeyboardInterrupt)


def storage_url(args, out):
    """The study's database: --storage, else SQLite in the run folder."""
    return args.storage or f"sqlite:///{(out / 'study.db').resolve()}"


def masked(url):
    """The URL with its password hidden: it is printed."""
    import re
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def storage_failure(error, url):
    """'host:port: what failed' when `error`, or an error it arose from, is the
    database's (SQLAlchemy's OperationalError: no server, a wrong password, no such
    database, a lost connection), else None."""
    import sqlalchemy
    while error is not None and not isinstance(error, (sqlalchemy.exc.OperationalError,
                                                       sqlalchemy.exc.InterfaceError)):
        error = error.__cause__ or error.__context__
    if error is None:
        return None
    # psycopg: 'connection failed: connection to server at "h", port p failed: FATAL:  what'
    message = str(error.orig).strip().split("FATAL:")[-1].split(" failed: ")[-1].strip()
    what = message.splitlines()[0] if message else type(error.orig).__name__
    if "refused" in what.lower():
        what = "connection refused (is the server running?)"
    elif "authentication failed" in what:
        what += " (wrong user or password?)"
    url = sqlalchemy.engine.make_url(url)
    where = url.database if url.get_backend_name() == "sqlite" else f"{url.host}:{url.port or 5432}"
    return f"{where}: {what}"


def search_picture(path, study):
    """search.png, from Optuna's own plots: the optimisation history of the
    completed trials, every trial's validation error over the epochs (pruned ones
    stop early), and which edges' loss and gate choices matter most (parameter
    importances, once two trials have completed). Its data is trials.csv."""
    from common.folder import pyplot, save_figure

    plt = pyplot()  # Agg, before Optuna's plots import pyplot
    import optuna.visualization.matplotlib as plots

    with plt.style.context("default"):  # Optuna's plots switch the global style to ggplot: keep it to them
        drawn = [plots.plot_optimization_history(study).figure, plots.plot_intermediate_values(study).figure]
        try:
            drawn.append(plots.plot_param_importances(study).figure)
        except (ValueError, RuntimeError):  # too few completed trials, or no variation among them
            pass
    fig, axes = plt.subplots(1, len(drawn), figsize=(6 * len(drawn), 4.5), squeeze=False)
    for ax, part in zip(axes[0], drawn):
        part.set_size_inches(6, 4.5)
        part.tight_layout()
        part.canvas.draw()
        ax.imshow(part.canvas.buffer_rgba())
        ax.axis("off")
        plt.close(part)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def trial_rows(trials):
    """The table of the trials: state, validation error, epochs run, and the sampled edges."""
    params = sorted({name for trial in trials for name in trial.params})
    return [{"number": t.number, "state": t.state.name, "val_error": t.value,
             "epochs": (t.last_step + 1) if t.last_step is not None else 0,
             "duration_s": t.duration.total_seconds() if t.duration else None,
             "worker": t.user_attrs.get("worker"), **{name: t.params.get(name) for name in params}}
            for t in trials]
