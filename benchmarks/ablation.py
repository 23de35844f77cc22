"""The paper's claim at small scale: STELLAR (r = 16) against three ablations at an equal CPU budget per run.

    python -m benchmarks.ablation [minutes=10] [data=shapes,digits] [variants=stellar,autoencoder,align_only,dense]
                                  [jobs=2] [n_eval=1000] [seed=0] [out=runs/ablation] [readme=true]

For every data set and variant it trains the tiny tokenizer (`configs/tokenizer/tiny.yaml`, `train.steps=100000`
with `train.max_cpu_minutes=minutes`, one thread per run, `jobs` runs at once), evaluates it with
`stellar_tok.evaluate` (PSNR, SSIM, rFID, linear and kNN probes; no LPIPS offline), then writes the table to
docs/BENCHMARKS.md, a short verdict to docs/RESULTS.md and a picture per data set to docs/images/ablation_<data>.png.

Variants (the paper's claim: the factorised latent keeps the reconstruction of an autoencoder and the semantics
of alignment-only training at once):
  stellar      STELLAR as in tiny.yaml
  autoencoder  (a) align.enabled=false: reconstruction losses only
  align_only   (b) recon.enabled=false: alignment losses only (the decoder stays at its random initialisation)
  dense        (c) model.decoder_input=dense: the decoder reads every patch feature instead of L·S

Runs go to `out/<data>/<variant>/` (train.log, eval.log, the trainer's outputs, eval/metrics.json). A finished
run or evaluation is reused when the command is run again with the same settings; a killed training run
resumes (its CPU budget survives the resume). Set STELLAR_TOK_CACHE to reuse cached FID weights and
reference statistics.
"""
from __future__ import annotations

import json
import os
import re
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torchvision.utils import make_grid, save_image

from benchmarks.common import arg_text, changed_args, fmt, machine, parse_args, run_logged, write_section
from stellar_tok import StellarTokenizer
from stellar_tok.config import DataConfig
from stellar_tok.data.reference import image_batches
from stellar_tok.errors import UserError, cli_entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "RESULTS.md")  # the verdict block lives in the results page
IMAGES = os.path.join(ROOT, "docs", "images")

VARIANTS = {  # name -> (label, overrides)
    "stellar": ("STELLAR, r = 16 (`tiny.yaml`)", []),
    "autoencoder": ("(a) autoencoder", ["align.enabled=false"]),
    "align_only": ("(b) alignment only", ["recon.enabled=false"]),
    "dense": ("(c) dense decoder", ["model.decoder_input=dense"]),
}
DATA = {  # name -> training overrides (digits: no rotations, as in the digits run of docs/RESULTS.md)
    "shapes": ["data.name=shapes"],
    "digits": ["data.name=digits", "views.rotation=0"],
}
VERDICT_BEGIN, VERDICT_END = "<!-- ablation:begin -->", "<!-- ablation:end -->"


@dataclass
class AblationArgs:
    minutes: float = 10  # process CPU minutes per training run
    data: str = "shapes,digits"  # comma-separated data sets: shapes, digits
    variants: str = ",".join(VARIANTS)  # comma-separated: stellar, autoencoder, align_only, dense
    jobs: int = 2  # runs at once, one thread each
    n_eval: int = 1000  # held-out images evaluated
    seed: int = 0  # train.seed and the probes' seed
    out: str = "runs/ablation"  # runs go to out/<data>/<variant>/
    readme: bool = True  # also write the verdict to docs/RESULTS.md


def read_args(argv: list[str] | None) -> AblationArgs:
    args = parse_args("python -m benchmarks.ablation", __doc__, AblationArgs, argv, "minutes=10 data=shapes")
    for key, allowed in (("data", DATA), ("variants", VARIANTS)):
        bad = [x for x in getattr(args, key).split(",") if x not in allowed]
        if bad:
            raise UserError(f"{key}: unknown {bad}; choose from {', '.join(allowed)}")
    return args


def train_overrides(data: str, variant: str, args: AblationArgs, run_dir: str) -> list[str]:
    return ["config=configs/tokenizer/tiny.yaml", *DATA[data], *VARIANTS[variant][1], "train.steps=100000",
            f"train.max_cpu_minutes={arg_text(args.minutes)}", f"train.seed={args.seed}", f"train.output_dir={run_dir}",
            "train.resume=auto", "train.progress=false"]


def eval_overrides(data: str, args: AblationArgs, run_dir: str) -> list[str]:
    return [f"tokenizer={run_dir}/tokenizer", f"data.name={data}", "tasks=recon,linear,knn", "lpips=none", "baselines=false",
            f"n_eval={args.n_eval}", f"seed={args.seed}", f"out={run_dir}/eval", "progress=false"]


def run_one(data: str, variant: str, args: AblationArgs) -> dict:
    """Train (or reuse) and evaluate (or reuse) one run; returns its record."""
    run_dir = os.path.join(args.out, data, variant)
    os.makedirs(run_dir, exist_ok=True)
    record_path = os.path.join(run_dir, "ablation_run.json")
    settings = {"data": data, "variant": variant, "minutes": args.minutes, "seed": args.seed,
                "train": train_overrides(data, variant, args, run_dir)}
    record = json.load(open(record_path)) if os.path.exists(record_path) else {}
    if record.get("settings", settings) != settings:
        raise RuntimeError(f"{run_dir} was trained with other settings ({record['settings']}); use another out=")
    record["settings"] = settings
    if "train" not in record:
        print(f"[{time.strftime('%H:%M:%S')}] train {data}/{variant}", flush=True)
        record["train"] = run_logged([sys.executable, "-m", "stellar_tok.train", *settings["train"]], os.path.join(run_dir, "train.log"))
        json.dump(record, open(record_path, "w"), indent=1)
    metrics = os.path.join(run_dir, "eval", "metrics.json")
    ev = eval_overrides(data, args, run_dir)
    if record.get("eval_cmd") != ev or not os.path.exists(metrics):
        print(f"[{time.strftime('%H:%M:%S')}] evaluate {data}/{variant}", flush=True)
        record["eval"] = run_logged([sys.executable, "-m", "stellar_tok.evaluate", *ev], os.path.join(run_dir, "eval.log"))
        record["eval_cmd"] = ev
        json.dump(record, open(record_path, "w"), indent=1)
    print(f"[{time.strftime('%H:%M:%S')}] done {data}/{variant}", flush=True)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    report = json.load(open(metrics))
    return {**record, "summary": summary, "metrics": report["results"]["stellar"], "n_eval": report["data"]["n_eval"],
            "n_train": report["data"]["n_train"], "latent_values": report["tokenizer"]["latent_values"], "run_dir": run_dir}


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def verdict(runs: dict, data: str) -> dict | None:
    """The issue's criterion: STELLAR within 1 dB PSNR of (a) and within 3 points linear top-1 of (b)."""
    need = ("stellar", "autoencoder", "align_only")
    if not all((data, v) in runs for v in need):
        return None
    m = {v: runs[(data, v)]["metrics"] for v in need}
    d_psnr = m["stellar"]["psnr"] - m["autoencoder"]["psnr"]
    d_lin = m["stellar"]["linear_tokens"] - m["align_only"]["linear_tokens"]
    return {"psnr": m["stellar"]["psnr"], "psnr_ae": m["autoencoder"]["psnr"], "d_psnr": d_psnr, "psnr_ok": d_psnr >= -1.0,
            "linear": m["stellar"]["linear_tokens"], "linear_align": m["align_only"]["linear_tokens"], "d_linear": d_lin,
            "linear_ok": d_lin >= -3.0}


def verdict_line(data: str, v: dict) -> str:
    both = v["psnr_ok"] and v["linear_ok"]
    return (f"**{data}: the claim {'holds' if both else 'does not hold'}.** PSNR {v['psnr']:.2f} dB against "
            f"{v['psnr_ae']:.2f} for the autoencoder ({v['d_psnr']:+.2f} dB: {'within' if v['psnr_ok'] else 'not within'} 1 dB); "
            f"linear top-1 {v['linear']:.2f}% against {v['linear_align']:.2f}% for alignment only "
            f"({v['d_linear']:+.2f} points: {'within' if v['linear_ok'] else 'not within'} 3 points).")


def facts_line(runs: dict, data: str) -> str | None:
    """Steps made in the budget, and what the dense decoder changes against STELLAR (computed, not interpreted)."""
    have = lambda v: (data, v) in runs  # noqa: E731
    if not have("stellar"):
        return None
    st = runs[(data, "stellar")]
    parts = []
    if have("autoencoder"):
        ae = runs[(data, "autoencoder")]
        parts.append(f"in the same CPU time the autoencoder made {ae['summary']['step']:,} steps against STELLAR's {st['summary']['step']:,} "
                     f"({ae['summary']['step'] / st['summary']['step']:.1f}x)")
    if have("dense"):
        de, ms = runs[(data, "dense")]["metrics"], st["metrics"]
        parts.append(f"the dense decoder (c) against STELLAR: PSNR {de['psnr'] - ms['psnr']:+.2f} dB, linear {de['linear_tokens'] - ms['linear_tokens']:+.2f} "
                     f"points, kNN {de['knn_tokens'] - ms['knn_tokens']:+.2f} points")
    return f"{data}: " + "; ".join(parts) + "." if parts else None


def command_line(args: AblationArgs) -> str:
    extra = " ".join(changed_args(args, ["minutes", "data", "variants", "n_eval", "seed"]))
    return "STELLAR_TOK_CACHE=runs/eval/cache python -m benchmarks.ablation" + (f" {extra}" if extra else "")


def table(runs: dict, args: AblationArgs) -> str:
    lines = ["| data | model | overrides | seed | latent numbers / image | steps × 64 | CPU min (process) | PSNR (dB) | SSIM | rFID | linear, mean of S | kNN, mean of S | linear, CLS | kNN, CLS |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for data in args.data.split(","):
        for variant in args.variants.split(","):
            r = runs.get((data, variant))
            if r is None:
                continue
            m = r["metrics"]
            over = " ".join(f"`{o}`" for o in VARIANTS[variant][1]) or "–"
            lines.append(f"| {data} | {VARIANTS[variant][0]} | {over} | {r['settings']['seed']} | {r['latent_values']:,} | {r['summary']['step']:,} | "
                         f"{r['train']['cpu_s'] / 60:.1f} | {fmt(m.get('psnr'))} | {fmt(m.get('ssim'), 3)} | {fmt(m.get('rfid'), 1)} | "
                         f"{fmt(m.get('linear_tokens'))} | {fmt(m.get('knn_tokens'))} | {fmt(m.get('linear_cls'))} | {fmt(m.get('knn_cls'))} |")
    return "\n".join(lines)


def write_report(runs: dict, args: AblationArgs, pictures: list[str]) -> None:
    datas = args.data.split(",")
    minutes = arg_text(args.minutes)
    n_evals = ", ".join(f"{d} {next(r['n_eval'] for (dd, _), r in runs.items() if dd == d)}" for d in datas if any(dd == d for dd, _ in runs))
    n_trains = ", ".join(f"{d} {next(r['n_train'] for (dd, _), r in runs.items() if dd == d)}" for d in datas if any(dd == d for dd, _ in runs))
    verdicts = [(d, verdict(runs, d)) for d in datas]
    body = f"""```bash
{command_line(args)}
```

{machine()}. Each run: `configs/tokenizer/tiny.yaml` plus the overrides below (digits also `views.rotation=0`),
`train.steps=100000 train.max_cpu_minutes={minutes}`: every run stops after the same {minutes} minutes of
process CPU time, one thread each (`OMP_NUM_THREADS=1`), {args.jobs} runs at a time. Seeds: `train.seed` as in
the table (initial weights, views), `data.seed=0`, probe seed = `train.seed`. "CPU min" is the whole training
process (start-up, final statistics and export included), from `os.wait4`. Evaluation: `stellar_tok.evaluate` on
the first held-out images of the val split ({n_evals}), probes trained on {n_trains} train images; LPIPS not
computed (no VGG weights offline). PSNR, SSIM and rFID are of encode -> decode; for (b) the decoder is never
trained, so its reconstruction columns only show that. rFID compares at equal image counts only.
"Latent numbers" counts what depends on the image: r·c + N·r for STELLAR, N·c for the dense decoder (its L is the fixed
identity), so at 32 px the dense latent is the smaller one.

{table(runs, args)}

The criterion of the paper's claim: STELLAR within 1 dB PSNR of (a) and within 3 points linear top-1
(mean of S) of (b), both at once.

""" + "\n".join(f"- {verdict_line(d, v)}" for d, v in verdicts if v) + "\n\n" + "\n".join(
        f"- {line}" for line in (facts_line(runs, d) for d in datas) if line) + ("\n\nReconstructions (first val images; rows: input, then "
          + ", ".join(VARIANTS[v][0] for v in args.variants.split(",")) + "): "
          + ", ".join(f"`docs/images/{os.path.basename(p)}`" for p in pictures) if pictures else "")
    write_section("The paper's claim at small scale (ablation)", body)
    if args.readme:
        write_verdict(verdicts, args)


def write_verdict(verdicts: list, args: AblationArgs) -> None:
    lines = [VERDICT_BEGIN, "## The paper's claim at small scale", "",
             f"STELLAR (r = 16) against (a) the same model without alignment losses (an autoencoder), (b) without "
             f"reconstruction losses (alignment only) and (c) a decoder reading all patch features instead of L·S "
             f"(`model.decoder_input=dense`), each trained for the same {arg_text(args.minutes)} minutes of CPU time (one thread, "
             f"seed {args.seed}), evaluated as in `docs/EVALUATION.md` (`{command_line(args)}`; full table with rFID, kNN and CLS in "
             f"`docs/BENCHMARKS.md`). The claim: PSNR within 1 dB of (a) and linear top-1 within 3 points of (b), both at once.", ""]
    lines += [f"- {verdict_line(d, v)}" for d, v in verdicts if v]
    if any(v and not (v["psnr_ok"] and v["linear_ok"]) for _, v in verdicts):
        lines += ["", "What was tried to make the alignment losses work at this scale (conv stem, contrastive image-level "
                  "term on the mean of S, per-slot token balance) is under \"Why the reference recipe did not learn here, "
                  "and what changed\" above; these runs use that recipe (`tiny.yaml`) unchanged."]
    lines.append(VERDICT_END)
    block = "\n".join(textwrap.fill(line, 110, subsequent_indent="  " if line.startswith("- ") else "", break_on_hyphens=False)
                      if len(line) > 110 else line for line in lines)
    text = open(RESULTS).read()
    if VERDICT_BEGIN in text and VERDICT_END in text:
        text = re.sub(re.escape(VERDICT_BEGIN) + ".*?" + re.escape(VERDICT_END), lambda _: block, text, flags=re.S)
    else:  # first time: after the evaluation results, before the pictures
        anchor = "\n## Pictures\n"
        text = text.replace(anchor, "\n" + block + "\n" + anchor, 1) if anchor in text else text.rstrip() + "\n\n" + block + "\n"
    with open(RESULTS, "w") as f:
        f.write(text)


def pictures(runs: dict, args: AblationArgs, n: int = 8) -> list[str]:
    """docs/images/ablation_<data>.png: input, then each variant's reconstruction of the first n val images."""
    os.makedirs(IMAGES, exist_ok=True)
    paths = []
    for data in args.data.split(","):
        variants = [v for v in args.variants.split(",") if (data, v) in runs]
        if not variants:
            continue
        images, _ = next(image_batches(OmegaConf.structured(DataConfig(name=data, resolution=32)), "val", n, n))
        x = images.float() / 127.5 - 1
        rows = [x]
        for v in variants:
            tok = StellarTokenizer.from_pretrained(os.path.join(runs[(data, v)]["run_dir"], "tokenizer")).eval()
            rows.append(tok.decode(tok.encode(x)))
        grid = torch.nn.functional.interpolate((torch.cat(rows) + 1) / 2, scale_factor=3, mode="nearest")
        path = os.path.join(IMAGES, f"ablation_{data}.png")
        save_image(make_grid(grid, nrow=len(x), padding=2, pad_value=1.0), path)
        paths.append(path)
    return paths


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = read_args(argv)
    args.out = os.path.abspath(args.out)
    jobs = [(d, v) for d in args.data.split(",") for v in args.variants.split(",")]
    t = time.time()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {job: pool.submit(run_one, *job, args) for job in jobs}
        runs = {job: f.result() for job, f in futures.items()}
    print(f"all runs done in {(time.time() - t) / 60:.1f} min", flush=True)
    write_report(runs, args, pictures(runs, args))
    print(table(runs, args))
    for d in args.data.split(","):
        v = verdict(runs, d)
        if v:
            print(verdict_line(d, v))
    return runs


if __name__ == "__main__":
    main()
