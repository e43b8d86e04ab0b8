"""The shared volume's contract between controller and trainer: layout, durable writes, manifests, records.

Torch-free on purpose: the controller imports this package to read the run's state from the volume, the
trainer imports it to write and verify checkpoints. Nothing here knows what is inside a checkpoint beyond
file names, sizes and sha256 hashes. One job per module:

    layout.py       where everything lives (RunLayout, checkpoint folder names, snapshot folders)
    durable.py      fsync and atomic JSON writes, never through a symlink (dir fds walked with O_NOFOLLOW)
    tenancy.py      which volume paths a namespace may read (its own prefixes, the shared area)
    hashing.py      per-chunk sha256 on every core; verification that is the read
    manifests.py    checkpoint manifests: write last, read, verify (format 2 per-chunk, format 1 whole-file)
    checkpoints.py  newest valid checkpoint, quarantine, retention, stale temp folders
    snapshots.py    dataset snapshot manifests
    records.py      typed progress.json, history.jsonl and legs/<n>.json
    fencing.py      the run's generation (fence.json): a superseded leg commits nothing
    termination.py  the one-line termination message
    exitcodes.py    the trainer's exit codes
    errors.py       CheckpointInvalid

Layout (see ARCHITECTURE.md)::

    snapshots/<sha256>/                 dataset snapshot + snapshot.json (written last)
    runs/<namespace>/<name>/
      config.json                       resolved trainer config the legs run with
      progress.json                     machine-readable progress, rewritten atomically
      history.jsonl                     one line per progress log line, leg start, checkpoint, evaluation
      checkpoints/step-<000000123>/     checkpoint files + manifest.json (written last)
      checkpoints/.tmp-*                in-progress writes; never read, removed on trainer start
      quarantine/<name>.<unix-ms>/      corrupt checkpoints moved aside, with reason.txt
      final/                            finished model + tokenizer + metrics.json + manifest.json
      legs/<n>.json                     what each leg started from and how it ended
      fence.json                        the newest launched leg's generation and resume step (controller)

The names below are the package's public API: `from trainer.volume import X` for any of them.
"""

from trainer.volume.checkpoints import (
    QuarantinedCheckpoint,
    find_latest_checkpoint,
    find_latest_verified,
    list_checkpoint_dirs,
    list_quarantined,
    quarantine,
    remove_stale_temp_dirs,
    select_for_deletion,
)
from trainer.volume.durable import (
    SymlinkRefused,
    atomic_write_json,
    fsync_dir,
    fsync_file,
    fsync_files,
    json_document,
    read_json,
)
from trainer.volume.errors import CheckpointInvalid
from trainer.volume.exitcodes import ExitCode
from trainer.volume.fencing import Fenced, FenceRecord, FenceUnreadable, read_fence, write_fence
from trainer.volume.hashing import (
    CHECKPOINT_HASH,
    CHUNK_BYTES,
    FileBytes,
    FileEntry,
    chunk_spans,
    file_digests,
    new_hasher,
    sha256_file,
    submit_digests,
)
from trainer.volume.layout import (
    TMP_PREFIX,
    RunLayout,
    checkpoint_dir_name,
    model_folders,
    parse_step,
    run_path,
    snapshot_dir,
)
from trainer.volume.manifests import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    CheckpointInfo,
    VerifiedCheckpoint,
    compose_manifest,
    open_verified_checkpoint,
    read_checkpoint,
    write_manifest,
)
from trainer.volume.records import (
    PROGRESS_STATES,
    HistoryEntry,
    LegRecord,
    Progress,
    append_history,
    load_progress,
    read_history,
    read_leg_record,
    read_leg_records,
    read_progress,
    write_leg_record,
    write_progress,
)
from trainer.volume.snapshots import (
    SNAPSHOT_DATA_DIR,
    SNAPSHOT_MANIFEST_NAME,
    SNAPSHOT_SPLITS,
    SnapshotInfo,
    read_snapshot,
    write_snapshot_manifest,
)
from trainer.volume.termination import (
    TERMINATION_LOG_ENV,
    TERMINATION_MESSAGE_MAX_BYTES,
    read_termination_message,
    write_termination_message,
)

__all__ = [
    "CHECKPOINT_HASH",
    "CHUNK_BYTES",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "PROGRESS_STATES",
    "SNAPSHOT_DATA_DIR",
    "SNAPSHOT_MANIFEST_NAME",
    "SNAPSHOT_SPLITS",
    "TERMINATION_LOG_ENV",
    "TERMINATION_MESSAGE_MAX_BYTES",
    "TMP_PREFIX",
    "CheckpointInfo",
    "CheckpointInvalid",
    "ExitCode",
    "FenceRecord",
    "FenceUnreadable",
    "Fenced",
    "FileBytes",
    "FileEntry",
    "HistoryEntry",
    "LegRecord",
    "Progress",
    "QuarantinedCheckpoint",
    "RunLayout",
    "SnapshotInfo",
    "SymlinkRefused",
    "VerifiedCheckpoint",
    "append_history",
    "atomic_write_json",
    "checkpoint_dir_name",
    "chunk_spans",
    "compose_manifest",
    "file_digests",
    "find_latest_checkpoint",
    "find_latest_verified",
    "fsync_dir",
    "fsync_file",
    "fsync_files",
    "json_document",
    "list_checkpoint_dirs",
    "list_quarantined",
    "load_progress",
    "model_folders",
    "new_hasher",
    "open_verified_checkpoint",
    "parse_step",
    "quarantine",
    "read_checkpoint",
    "read_fence",
    "read_history",
    "read_json",
    "read_leg_record",
    "read_leg_records",
    "read_progress",
    "read_snapshot",
    "read_termination_message",
    "remove_stale_temp_dirs",
    "run_path",
    "select_for_deletion",
    "sha256_file",
    "snapshot_dir",
    "submit_digests",
    "write_fence",
    "write_leg_record",
    "write_manifest",
    "write_progress",
    "write_snapshot_manifest",
    "write_termination_message",
]
