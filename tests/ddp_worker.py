"""The two CPU processes of ``tests/test_distributed.py`` (DDP over gloo).

Each process runs :func:`worker` once; imports and the real utterances are paid once for
every case of ``tests/model_zoo.py``:

1. DDP step check: the case's model wrapped as ESPnet's trainer wraps it
   (``DistributedDataParallel(find_unused_parameters=False)``), two training steps on
   this rank's shard ``batch[rank::world]`` of one global batch (ESPnet's sharding), the
   loss weighted as ESPnet's trainer weights it. Step 1's all-reduced gradients must
   equal one process's gradients of the same weighted loss over both shards, and the
   parameters after step 2 must be identical on both ranks. An unused parameter would
   make step 2 raise (DDP's reducer) instead of hanging; the error is reported.
2. ESPnet's own trainer: ``ASRTask.main`` with ``--ngpu 0 --dist_backend gloo`` and
   ``--multiprocessing_distributed false`` (ESPnet 202511's CPU path: one process per
   rank, started by a launcher) trains one epoch of two steps on real utterances.

Rank 0 writes ``{case: {...}}`` as JSON to ``<out>/results.json``.
"""

import copy
import json
import os
import random
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import real_speech_batch
from espnet_trainer import asr_train, write_data
from model_zoo import build_case, load_case

NUM_UTTS = 8  # 2 global batches of 4 for the trainer; the first 4 for the step check


def _seed(step: int, rank: int) -> None:
    # Dropout, dynamic chunk and Gumbel draws of (step, rank), replayable by rank 0.
    torch.manual_seed(1000 * step + rank)
    random.seed(1000 * step + rank)


def shard(batch: dict, rank: int, world: int) -> dict:
    """ESPnet's distributed sharding ``batch[rank::world]``, padded to the shard's
    own longest utterance as ESPnet's collate pads it."""
    out = {k: v[rank::world] for k, v in batch.items()}
    out["speech"] = out["speech"][:, : int(out["speech_lengths"].max())]
    out["text"] = out["text"][:, : int(out["text_lengths"].max())]
    return out


def _weighted(loss, weight, total, world):
    # espnet2.train.trainer: loss * weight / sum of all ranks' weights * world size
    # (DistributedDataParallel divides the gradient sum by the world size).
    return loss * weight.to(loss.dtype) / total * world


def ddp_step_check(conf: dict, batch: dict, rank: int, world: int) -> dict:
    model = build_case(conf).train()
    if rank == 0:  # the one-process reference, from the same start
        reference = copy.deepcopy(model)
        buffers = {n: b.clone() for n, b in model.named_buffers()}
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    shards = [shard(batch, r, world) for r in range(world)]
    total = float(sum(len(s["speech"]) for s in shards))
    grads = {}
    for step in range(2):
        _seed(step, rank)
        loss, _, weight = ddp(**shards[rank])
        _weighted(loss, weight, total, world).backward()
        if step == 0:
            grads = {
                n: p.grad.clone()
                for n, p in model.named_parameters()
                if p.grad is not None
            }
        opt.step()
        opt.zero_grad()
    flat = torch.cat([p.detach().reshape(-1).double() for p in trainable])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    result = {"ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered)}
    if rank == 0:
        # One process, both shards, each with its rank's random draws and the
        # start-of-step buffers (e.g. the I3D temperature step) DDP gives that rank.
        for r in range(world):
            with torch.no_grad():
                for n, b in reference.named_buffers():
                    b.copy_(buffers[n])
            _seed(0, r)
            loss, _, weight = reference(**shards[r])
            _weighted(loss, weight, total, 1).backward()
        expected = {
            n: p.grad for n, p in reference.named_parameters() if p.grad is not None
        }
        result["same_grad_params"] = sorted(grads) == sorted(expected)
        result["max_grad_diff"] = max(
            float((grads[n] - expected[n]).abs().max() / (expected[n].abs().max() + 1))
            for n in expected
        )
        result["num_grads"] = len(expected)
    return result


def train_ddp(conf: dict, data: Path, out: Path, rank: int, world: int) -> bool:
    """One epoch of ESPnet's trainer as rank ``rank`` of ``world`` CPU processes."""
    asr_train(
        conf,
        data,
        out,
        "--dist_backend",
        "gloo",
        "--dist_init_method",
        "env://",
        "--dist_world_size",
        str(world),
        "--dist_rank",
        str(rank),
        "--multiprocessing_distributed",
        "false",
    )
    dist.destroy_process_group()
    return (out / "1epoch.pth").exists()


def worker(rank: int, world: int, port: int, out_dir: str, corpus: str, cases):
    out, corpus = Path(out_dir), Path(corpus)
    tokens, batch, _ = real_speech_batch(corpus, NUM_UTTS, space="<space>")
    global_batch = {k: v[:4] for k, v in batch.items()}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A broken case must fail, not hang the test suite.
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    confs = {name: load_case(name, tokens, out / f"{name}{rank}") for name in cases}
    results = {}
    for name in cases:
        try:
            results[name] = ddp_step_check(confs[name], global_batch, rank, world)
        except Exception:
            results[name] = {"error": traceback.format_exc()[-2000:]}
    dist.destroy_process_group()
    data = write_data(out / f"data{rank}", tokens, corpus, NUM_UTTS)
    for i, name in enumerate(cases):
        os.environ["MASTER_PORT"] = str(port + 1 + i)
        try:
            trained = train_ddp(confs[name], data, out / f"{name}{rank}", rank, world)
            results[name]["espnet_trainer"] = trained
        except BaseException:  # ESPnet's main may sys.exit
            results[name]["espnet_trainer"] = traceback.format_exc()[-2000:]
            if dist.is_initialized():
                dist.destroy_process_group()
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
