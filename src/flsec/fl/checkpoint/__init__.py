"""The run directory ("train once, attack many"): committed round by round as a unit, read as
untrusted input.

Layout::

    meta.json                                   the manifest and commit point: config, seed, round, status,
                                                metrics, versions, captures, the sha256 of every file below and
                                                the sha256 of the manifest itself
    rounds/round_<r>/model.safetensors          global weights after round r   (only the last committed round
    rounds/round_<r>/state.safetensors          what a resume needs             is kept; r = 0 is the initial
    rounds/round_<r>/history.jsonl              one line of metrics per round   model, before any round)
    model.safetensors, history.jsonl            links to the last committed round's files, for other tools
    updates/round_<r>/global_model.safetensors  the global weights sent to clients in a captured round
    updates/round_<r>/client_<c>.safetensors    captured updates / FedSGD gradients (+ replay metadata)
    evaluation_only/round_<r>/client_<c>.safetensors
                                                ground-truth images of captured batches: used only to
                                                score reconstructions, never by an attack

**Commit protocol.** A round's files are written (each atomically) into a fresh ``rounds/round_<r>/``
and its captures under ``updates/`` and ``evaluation_only/``; then ``meta.json`` is replaced in one
atomic rename: that rename *is* the commit. Only then are the previous round's folder and the
top-level links updated. A process killed at any instant leaves ``meta.json`` naming a complete,
hash-consistent round (the new one or the previous one); files of an uncommitted round are
unreferenced leftovers that the next writer removes.

**Loading.** ``meta.json`` is parsed as strict JSON, validated against a schema and checked against its
own hash; every file it names must be a regular file inside the directory (no ``..``, no absolute
path, no symlink anywhere on the way) with the listed sha256; tensors are read with safetensors only
and checked for names, shapes, dtypes and finiteness before use. Plugin modules named in a
checkpoint's config are never imported: the user enables plugins with ``--plugin`` (their own choice).

The parts, one job each:

* :mod:`.manifest`: the schema of ``meta.json``, its self-digest and the strict reader;
* :mod:`.layout`: where each file lives, the top-level links and the removal of an interrupted writer's
  leftovers (never through a link, never outside the directory);
* :mod:`.tensors`: safetensors reading and the weight checks;
* :mod:`.captures`: captured updates / gradients and their ground truth, checked against the manifest;
* :mod:`.commit`: :class:`RunWriter`, the round commit and its resume;
* :mod:`.load`: :class:`Checkpoint`, :func:`load_checkpoint` and :func:`verify_run`.
"""

from flsec.fl.checkpoint.captures import CaptureMeta
from flsec.fl.checkpoint.commit import RunWriter
from flsec.fl.checkpoint.layout import (
    ALIASES,
    FLSEC_NAMES,
    META,
    capture_path,
    generation_dir,
    global_model_path,
    only_flsec_leftovers,
    refresh_alias,
    remove_leftovers,
)
from flsec.fl.checkpoint.load import Checkpoint, load_checkpoint, verify_run
from flsec.fl.checkpoint.manifest import FORMAT, MAX_META_BYTES, MetaSchema, library_versions, manifest_digest, read_meta
from flsec.fl.checkpoint.tensors import check_weights, read_tensor_metadata, read_tensors

__all__ = ["ALIASES", "FLSEC_NAMES", "FORMAT", "MAX_META_BYTES", "META", "CaptureMeta", "Checkpoint", "MetaSchema",
           "RunWriter", "capture_path", "check_weights", "generation_dir", "global_model_path", "library_versions",
           "load_checkpoint", "manifest_digest", "only_flsec_leftovers", "read_meta", "read_tensor_metadata",
           "read_tensors", "refresh_alias", "remove_leftovers", "verify_run"]
