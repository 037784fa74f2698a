"""The process group of a torchrun-restarted worker group, kept apart from the dead attempt's rendezvous keys."""

from __future__ import annotations

from collections.abc import Mapping

from review_lm.runs.launch import restart_store_prefix


def isolate_restarted_process_group(environ: Mapping[str, str]) -> str | None:
    """Initialise the default process group of a restarted worker group on a store prefixed by its restart count.

    Done before TrainingArguments: accelerate reuses an initialised default group (``if not
    torch.distributed.is_initialized()``). Same store as torch's env:// rendezvous would make (agent store: every
    rank a client; otherwise rank 0 hosts it), same default backend choice (gloo for CPU tensors, NCCL for CUDA).
    Returns the prefix used, or None when nothing was needed.
    """
    prefix = restart_store_prefix(environ)
    if prefix is None:
        return None
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        return None
    rank, world_size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
    agent_store = environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    timeout = timedelta(minutes=30)  # torch's default process-group timeout
    store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0, timeout=timeout, multi_tenant=not agent_store)
    dist.init_process_group(store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size,
                            timeout=timeout)
    return prefix
