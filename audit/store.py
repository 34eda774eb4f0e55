"""A campaign run directory: the validated campaign, a transactional trial table keyed by trial id, and per-trial
artefacts. One writer (the job's driver) records a trial in one transaction after its files are in place, so
a row means a complete trial; `INSERT OR IGNORE` on the id makes a repeated trial a no-op, never a duplicate.

Everything outside `audit/` reads a run only through the read-only functions at the end (`trial_scenes`,
`trial_scene`, `trial_metrics`): they create nothing in the run, not even SQLite's side files.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segmenters.files import atomic_write_bytes, atomic_write_text

SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    image_index INTEGER NOT NULL,
    target TEXT NOT NULL,
    object_id INTEGER NOT NULL,
    source_class INTEGER,
    to_class INTEGER,
    size INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    replay TEXT NOT NULL DEFAULT '{}',
    worker TEXT,
    seconds REAL,
    finished REAL NOT NULL,
    node TEXT
);
CREATE TABLE IF NOT EXISTS audits (
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    metrics TEXT NOT NULL,
    finished REAL NOT NULL,
    PRIMARY KEY (id, kind)
);
CREATE TABLE IF NOT EXISTS failures (
    id TEXT NOT NULL,
    trial TEXT NOT NULL,
    error TEXT NOT NULL,
    at REAL NOT NULL
)
"""


#: columns added to `trials` after runs were first stored, and their SQL types
ADDED_TRIAL_COLUMNS = {"node": "TEXT"}


class TrialStore:
    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "trials").mkdir(exist_ok=True)
        self.db = sqlite3.connect(self.root / "trials.sqlite", timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A run stored before a column existed gets it, empty (the node column came with multi-node campaigns)."""
        present = {row[1] for row in self.db.execute("PRAGMA table_info(trials)")}
        for name, kind in ADDED_TRIAL_COLUMNS.items():
            if name not in present:
                self.db.execute(f"ALTER TABLE trials ADD COLUMN {name} {kind}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> TrialStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def save_campaign(self, text: str, resolved_json: str | None = None) -> None:
        """The campaign as written (for people) and as validated, paths resolved (for later audits)."""
        atomic_write_text(self.root / "campaign.yaml", text)
        if resolved_json is not None:
            atomic_write_text(self.root / "campaign.json", resolved_json)

    def campaign_json(self) -> str:
        path = self.root / "campaign.json"
        if not path.exists():
            raise FileNotFoundError(f"{self.root} has no campaign.json (a run from before audits, or not a run)")
        return path.read_text()

    def done_ids(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT id FROM trials")}

    def artefact_dir(self, trial_id: str) -> Path:
        return self.root / "trials" / trial_id

    def record(self, trial: dict, metrics: dict, artefacts: dict[str, np.ndarray | bytes],
               replay: dict | None = None, worker: str | None = None, seconds: float | None = None,
               node: str | None = None) -> bool:
        """Write the trial's files, then its row, in one transaction. False if the id was already stored.
        `worker` is the process (host:pid), `node` the Ray node it ran on (`audit.runner.task_node`)."""
        self._write_artefacts(trial["id"], artefacts)
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO trials (id, model, image_index, target, object_id, source_class, to_class, size, "
            "seed, metrics, replay, worker, seconds, finished, node) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (trial["id"], trial["model"], trial["image_index"], trial["target"], trial["object_id"],
             trial["source_class"], trial["to_class"], trial["size"], trial["seed"],
             json.dumps(metrics, allow_nan=True), json.dumps(replay or {}), worker, seconds, time.time(), node))
        return cursor.rowcount == 1

    def trials_by_node(self) -> dict[str, int]:
        """How many stored trials ran on each node ("unknown" for trials stored without one)."""
        return {node or "unknown": count for node, count in
                self.db.execute("SELECT node, COUNT(*) FROM trials GROUP BY node ORDER BY node")}

    def record_audit(self, trial_id: str, kind: str, metrics: dict, artefacts: dict[str, np.ndarray | bytes]) -> bool:
        """An audit of a stored trial (e.g. kind "attribution"): files first, then the row; exactly once."""
        self._write_artefacts(trial_id, artefacts)
        cursor = self.db.execute("INSERT OR IGNORE INTO audits (id, kind, metrics, finished) VALUES (?, ?, ?, ?)",
                                 (trial_id, kind, json.dumps(metrics, allow_nan=True), time.time()))
        return cursor.rowcount == 1

    def audited_ids(self, kind: str) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT id FROM audits WHERE kind = ?", (kind,))}

    def audits(self, kind: str) -> dict[str, dict]:
        """trial id -> audit metrics."""
        return {i: json.loads(m) for i, m in self.db.execute("SELECT id, metrics FROM audits WHERE kind = ?", (kind,))}

    def _write_artefacts(self, trial_id: str, artefacts: dict[str, np.ndarray | bytes]) -> None:
        folder = self.artefact_dir(trial_id)
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in artefacts.items():
            atomic_write_bytes(folder / name, _npy_bytes(content) if isinstance(content, np.ndarray) else content)

    def record_failure(self, trial: dict, error: str) -> None:
        """A trial that raised: kept for the report, not counted as done (a resubmission tries it again)."""
        self.db.execute("INSERT INTO failures (id, trial, error, at) VALUES (?, ?, ?, ?)",
                        (trial["id"], json.dumps(trial), error, time.time()))

    def failures(self, outstanding: bool = True) -> list[dict]:
        """Failed attempts, oldest first; by default only those of trials still not stored (a resubmission that
        stored a trial settles its earlier failures; `outstanding=False` keeps the whole history)."""
        query = "SELECT id, trial, error, at FROM failures"
        if outstanding:
            query += " WHERE id NOT IN (SELECT id FROM trials)"
        return [{"id": i, "trial": json.loads(t), "error": e, "at": a}
                for i, t, e, a in self.db.execute(query + " ORDER BY at")]

    def rows(self) -> list[dict]:
        cursor = self.db.execute("SELECT * FROM trials ORDER BY finished")
        names = [d[0] for d in cursor.description]
        out = []
        for values in cursor:
            row = dict(zip(names, values))
            row["metrics"] = json.loads(row["metrics"])
            row["replay"] = json.loads(row["replay"])
            out.append(row)
        return out

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM trials").fetchone()[0]


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- read-only access
DB_NAME = "trials.sqlite"
SCENE_COLUMNS = "id, image_index, object_id, source_class, to_class"


@dataclass(frozen=True)
class TrialScene:
    """What a stored trial attacked and the patch it found: enough to re-create the scene with its patch."""

    trial: str  # trial id
    dataset: str  # the campaign's images.dataset, e.g. "shapes"
    split: str  # the campaign's images.split
    image_index: int
    object_id: int  # 1-based instance the patch is printed on (the trials table's object_id)
    source_class: int | None
    to_class: int | None
    patch: np.ndarray  # (3, s, s) float in [0, 1], as stored in trials/<id>/patch.npy


def _read_only(run_dir: str | Path) -> sqlite3.Connection:
    """The run's trial table, opened so that nothing is written: while a writer holds the table (its WAL file is
    there) read through SQLite's read-only mode, which then creates nothing; otherwise as an immutable file
    (plain read-only mode would leave -wal/-shm files behind in the run)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no campaign run at {run}")
    path = run / DB_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a campaign run (no {DB_NAME})")
    live = path.with_name(DB_NAME + "-wal").exists()
    uri = f"{path.resolve().as_uri()}?mode=ro" + ("" if live else "&immutable=1")
    return sqlite3.connect(uri, uri=True)


def _campaign_images(run: Path):
    from audit.campaign import ImageSet

    path = run / "campaign.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run} has no campaign.json (a run from before audits, or not a run)")
    images = json.loads(path.read_text()).get("images")
    if images is None:
        raise ValueError(f"{path} has no 'images' section")
    return ImageSet.model_validate(images)


def _scene(run: Path, images, row: tuple) -> TrialScene:
    trial, image_index, object_id, source_class, to_class = row
    patch_path = run / "trials" / trial / "patch.npy"
    if not patch_path.is_file():
        raise FileNotFoundError(f"trial {trial} in {run} has no stored patch ({patch_path})")
    return TrialScene(trial=trial, dataset=images.dataset, split=images.split, image_index=int(image_index),
                      object_id=int(object_id), source_class=source_class, to_class=to_class,
                      patch=np.load(patch_path, allow_pickle=False))


def trial_scenes(run_dir: str | Path, limit: int | None = None) -> list[TrialScene]:
    """The stored trials of a run, ordered by trial id (the first `limit` of them)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    run = Path(run_dir)
    db = _read_only(run)
    try:
        rows = db.execute(f"SELECT {SCENE_COLUMNS} FROM trials ORDER BY id LIMIT ?",
                          (-1 if limit is None else limit,)).fetchall()
    finally:
        db.close()
    images = _campaign_images(run) if rows else None
    return [_scene(run, images, row) for row in rows]


def trial_scene(run_dir: str | Path, trial_id: str) -> TrialScene:
    """One stored trial; ValueError naming the trial and the run when it is not there."""
    run = Path(run_dir)
    db = _read_only(run)
    try:
        row = db.execute(f"SELECT {SCENE_COLUMNS} FROM trials WHERE id = ?", (trial_id,)).fetchone()
    finally:
        db.close()
    if row is None:
        raise ValueError(f"no trial {trial_id!r} in campaign run {run}")
    return _scene(run, _campaign_images(run), row)


def trial_metrics(run_dir: str | Path) -> dict[str, dict]:
    """trial id -> its stored metrics, for every stored trial of a run (ordered by trial id)."""
    db = _read_only(run_dir)
    try:
        return {trial: json.loads(metrics) for trial, metrics in db.execute("SELECT id, metrics FROM trials ORDER BY id")}
    finally:
        db.close()
