"""The summary of `benchmarks/imagenet_rehearsal.sh` (`python -m benchmarks.imagenet_like stage=report`): WORK_DIR/stages.jsonl
and the files the stages wrote (their stats/*.json from `stage=run`, logs, summaries, metrics) -> RESULTS_DIR/summary.md
(one row per stage: exit, wall time, throughput, s/step, peak memory, notes) and summary.json, with the logs packed
into RESULTS_DIR/logs.tar.gz (at most 8 files in RESULTS_DIR, as the device tool returns).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tarfile

from stellar_tok.files import atomic_path, atomic_write_json


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _grep(path: str, pattern: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            hits = [m.group(0) for line in f if (m := re.search(pattern, line))]
        return hits[-1] if hits else None
    except OSError:
        return None


def _du_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return round(total / 2**20, 1)


def _gib(s: dict) -> str:
    if "peak_gpu_alloc_gib" in s:
        return f"{s['peak_gpu_alloc_gib']} ({s.get('peak_gpu_reserved_gib', '?')} reserved)"
    return f"- (RSS {s['peak_rss_gib']})" if "peak_rss_gib" in s else "-"


def _row_notes(stage: str, w: str) -> tuple[dict, str, str, str]:
    """(details, throughput, s/step, peak memory) of a stage from the files it wrote."""
    st = lambda name: _load(os.path.join(w, "stats", f"{name}.json"))  # noqa: E731
    log = os.path.join(w, "logs", f"{stage}.log")
    d: dict = {}
    thr = sps = mem = "-"
    if stage == "data_render":
        d = st("images")
        if d.get("images_per_s"):
            thr = f"{d['images_per_s']} img/s rendered ({d.get('workers')} processes)"
    elif stage.startswith("data_shards_"):
        split = stage.rsplit("_", 1)[1]
        d = {"line": _grep(log, r"wrote \d+ images, skipped .*")}
        shards = sorted(glob.glob(os.path.join(w, "shards", f"{split}-*.tar")))
        d["shards"], d["shards_mb"] = len(shards), round(sum(os.path.getsize(p) for p in shards) / 2**20, 1)
        if d["line"] and (m := re.match(r"wrote (\d+)", d["line"])):
            d["images"] = int(m.group(1))
    elif stage == "mae":
        d = st("mae")
    elif stage in ("b16", "h14_start", "h14_resume", "gen_train"):
        s = st(stage)
        out_dir = {"b16": "b16", "h14_start": "h14", "h14_resume": "h14", "gen_train": "gen"}[stage]
        summ = _load(os.path.join(w, out_dir, "summary.json"))
        d = {k: s[k] for k in ("status", "batches", "batch", "s_per_step_median", "s_per_step_before_split", "s_per_step_after_split",
                               "images_per_s", "first_batch_wait_s", "wait_s_total", "wait_share", "wait_s_median",
                               "peak_gpu_alloc_gib", "peak_gpu_reserved_gib", "peak_rss_gib", "device") if k in s}
        if summ:
            d["summary"] = {k: summ.get(k) for k in ("step", "images_seen", "seconds", "export", "skipped_samples", "stopped_by")}
            last = summ.get("last") or {}
            d["last"] = {k: last[k] for k in ("loss", "psnr", "align", "lpips", "gan_g", "gan_d", "loc_max", "token_proto_used") if k in last}
        for pat in (r"model\.init_from=\S+: .*", r"running: .*", r"resumed from \S+ at step \d+", r"done: .*"):
            if (hit := _grep(log, pat)):
                d.setdefault("log", []).append(hit[:300])
        export = os.path.join(w, out_dir, {"gen": "generator"}.get(out_dir, "tokenizer"))
        d["export_exists"] = os.path.isfile(os.path.join(export, "config.json"))
        if os.path.isdir(os.path.join(w, out_dir, "checkpoints")):
            d["checkpoints_mb"] = _du_mb(os.path.join(w, out_dir, "checkpoints"))
        if "images_per_s" in s:
            thr = f"{s['images_per_s']} img/s (batch {s.get('batch')})"
        if "s_per_step_median" in s:
            sps = str(s["s_per_step_median"])
            if "s_per_step_after_split" in s:
                sps += f" ({s.get('s_per_step_before_split', '?')} before / {s['s_per_step_after_split']} after GAN)"
        mem = _gib(s)
    elif stage == "tokenize":
        s = st(stage)
        d = {"line": _grep(log, r"tokenize: .*")}
        d.update({k: s[k] for k in ("peak_gpu_alloc_gib", "peak_rss_gib") if k in s})
        if d["line"] and (m := re.search(r"(\d+) img/s", d["line"])):
            thr = f"{m.group(1)} img/s (x2 with flips; decode on 1 core)"
        mem = _gib(s)
    elif stage == "sample":
        s, summ = st(stage), _load(os.path.join(w, "samples", "summary.json"))
        d = {"summary": summ}
        n, sec = summ.get("n") or summ.get("images") or summ.get("total"), summ.get("seconds")
        if n and sec:
            thr = f"{n / max(sec, 1e-9):.1f} img/s ({n} images)"
        mem = _gib(s)
    elif stage in ("fid_ref", "fid"):
        s = st(stage)
        if stage == "fid":
            m = _load(os.path.join(w, "eval", "metrics.json"))
            d = {"results": m.get("results"), "extractor": m.get("extractor"), "n_samples": m.get("n_samples"),
                 "reference_n": (m.get("reference") or {}).get("n")}
        mem = _gib(s)
    return d, thr, sps, mem


NOTES = {
    "data_render": "procedural ImageNet-like class folders (JPEG, grey/CMYK JPEG, PNG, 2 truncated files)",
    "data_shards_train": "python -m stellar_tok.make_shards (originals, not resized)",
    "data_shards_val": "python -m stellar_tok.make_shards, val split (classes.json of train)",
    "fid_weights": "random-weights torch-fidelity Inception-v3 for fid.weights= (the real one is not offline)",
    "mae": "random-weights ViT-MAE folder (HF layout, json + safetensors only) for model.init_from",
    "b16": "configs/tokenizer/vit_b16.yaml, GAN from recon.gan_start; LPIPS with a RANDOM backbone (no VGG weights offline)",
    "h14_start": "configs/tokenizer/vit_h14.yaml under FSDP2 (configs/accelerate/fsdp_h14.yaml), model.init_from=null",
    "h14_resume": "the same, train.resume=auto: continues the sharded checkpoint, exports again",
    "tokenize": "stellar_tok.tokenize of the train shards with the B/16 export, flip=true",
    "gen_train": "configs/generator/b.yaml on those latents",
    "sample": "generators.sample, class-conditional, every class",
    "fid_ref": "stellar_tok.fid_stats of the val split (random-weights Inception)",
    "fid": "generators.evaluate gFID: PLUMBING ONLY (random-weights Inception; the real weights are not offline)",
}


def stage_row(s: dict, w: str) -> tuple[str, dict]:
    """The table row of the stage record `s` (a line of stages.jsonl) and its details, from the files it wrote in `w`."""
    d, thr, sps, mem = _row_notes(s["stage"], w)
    extra = ""
    if s["stage"] == "b16" and "wait_share" in d:
        extra = f"; data wait {100 * d['wait_share']:.1f}% of step time after the first batch ({d.get('first_batch_wait_s')} s)"
    if s["stage"] in ("h14_start", "h14_resume"):
        extra = f"; export {'written' if d.get('export_exists') else 'MISSING'}"
        if s["stage"] == "h14_resume":
            extra += "; " + next((x for x in d.get("log", []) if x.startswith("resumed")), "NO resume line")
    if s["stage"] == "fid" and d.get("results"):
        extra = f"; gFID {d['results'].get('fid', float('nan')):.1f} on {d.get('n_samples')} samples vs {d.get('reference_n')} val images"
    if s["stage"] == "data_render" and d.get("kinds"):
        extra = (f"; {d.get('train')} train + {d.get('val')} val images, {d.get('classes')} classes, shorter side "
                 f"{d.get('short_side')}, {d.get('mean_kb')} KB mean, files by kind {d.get('kinds')}")
    if s["stage"].startswith("data_shards_") and d.get("line"):
        extra = f"; {d['line']}; {d.get('shards')} shards, {d.get('shards_mb')} MB"
        if d.get("images") and isinstance(s.get("wall_s"), (int, float)) and s["wall_s"] > 0:
            thr = f"{d['images'] / s['wall_s']:.0f} img/s (stage wall, start-up included)"
    if s["stage"] == "mae" and d:
        extra = f"; {d.get('tensors')} tensors, {d.get('params', 0) / 1e6:.1f} M parameters, {d.get('mb')} MB"
    if s["stage"] == "b16" and d.get("last"):
        extra += f"; last {d['last']}"
    status = "ok" if s["rc"] == 0 else ("SKIPPED" if s["rc"] == "skipped" else f"FAILED rc {s['rc']}")
    return f"| {s['stage']} | {status} | {s['wall_s']} | {thr} | {sps} | {mem} | {NOTES.get(s['stage'], '')}{extra} |", d


def pack_logs(w: str, res: str) -> None:
    """RESULTS_DIR/logs.tar.gz of the stages' logs and records, and the two pictures worth a look."""
    logs = os.path.join(res, "logs.tar.gz")
    with atomic_path(logs) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for pattern in ("logs/*.log", "stats/*.json", "stages.jsonl", "*/summary.json", "*/metrics.jsonl", "*/config.yaml",
                        "latents/manifest.json", "eval/metrics.*", "shards/classes.json"):
            for p in sorted(glob.glob(os.path.join(w, pattern))):
                if os.path.realpath(p).startswith(os.path.realpath(res) + os.sep):
                    continue
                tar.add(p, arcname=os.path.relpath(p, w))
    for src, dst in ((os.path.join(w, "samples", "grid.png"), "samples_grid.png"),):
        if os.path.isfile(src) and os.path.getsize(src) < 15 * 2**20:
            shutil.copyfile(src, os.path.join(res, dst))
    recon = sorted(glob.glob(os.path.join(w, "b16", "images", "step-*.png")))
    if recon and os.path.getsize(recon[-1]) < 15 * 2**20:
        shutil.copyfile(recon[-1], os.path.join(res, "b16_reconstruction.png"))


def write_report(w: str, res: str) -> None:
    """WORK_DIR/stages.jsonl and the files the stages wrote -> RESULTS_DIR/summary.md, summary.json and logs.tar.gz."""
    os.makedirs(res, exist_ok=True)
    stages = []
    try:
        with open(os.path.join(w, "stages.jsonl")) as f:
            stages = [json.loads(line) for line in f if line.strip()]
    except OSError:
        pass
    env = _load(os.path.join(w, "stats", "env.json"))
    rows, details = [], {}
    for s in stages:
        row, d = stage_row(s, w)
        rows.append(row)
        details[s["stage"]] = {**s, "details": d}
    total = round(sum(s["wall_s"] for s in stages if isinstance(s.get("wall_s"), (int, float))), 1)
    lines = [f"# ImageNet-path rehearsal (SCALE={env.get('scale', '?')})", "",
             f"Machine: {env.get('machine', '?')}. Stages' wall time together: {total} s. "
             "Peak memory: torch.cuda.max_memory_allocated of the stage's process (reserved in brackets), GiB; on CPU "
             "the process's peak RSS. Throughput: steady-state medians (steps after the first 3).", "",
             "| stage | exit | wall s | throughput | s/step | peak GPU mem GiB | what / notes |", "|---|---|---:|---|---|---|---|",
             *rows, ""]
    with open(os.path.join(res, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    atomic_write_json(os.path.join(res, "summary.json"), {"env": env, "stages": details})
    pack_logs(w, res)
    print("\n".join(lines))
