"""The paper's claim on real drawings at 10x compression: STELLAR against the reconstruction-only run of equal time.

    python -m benchmarks.real_images                       # CPU: configs/tokenizer/emoji64_cpu.yaml, 20 CPU-minutes each
    python -m benchmarks.real_images device=cuda           # one GPU: configs/tokenizer/emoji64_gpu.yaml, 3 minutes each

    python -m benchmarks.real_images minutes=25 tag=decoder_192x4 \
        "set=model.decoder_width=192 model.decoder_depth=4 model.decoder_heads=6"   # a variant of both runs

    keys: device=cpu|cuda  minutes=20 (cpu) | 3 (cuda)  data=data/emoji64  seed=0  n_eval=0 (all val)  jobs=2 (cpu)
          out=runs/real_images/<device>_<minutes>min[_<tag>]  write=true (docs/RESULTS.md and docs/images/)
          fid_weights= (an Inception-v3 weights file for rFID, as `stellar_tok.evaluate fid.weights=`; default: its own search)
          set= (training overrides for every run, space-separated key=value)  tag= (names such a variant)
          runs=stellar,recon_only (which runs; the claim's parts that need a missing run say so)

Data: the emoji set (`python -m stellar_tok.make_emoji out=data/emoji64`, built here when `data` has no shards).
Both runs use the same config, seed and time: on the CPU `train.max_cpu_minutes` (process CPU time, one thread per
run, `jobs` runs at once, so a shared machine does not favour either), on a GPU `train.max_minutes` (wall time, one
run after the other). `recon_only` is the same model with `align.enabled=false`. Each is evaluated with
`stellar_tok.evaluate` (every val image, probes trained on every train image; PSNR, SSIM, rFID, linear and kNN
probes on the mean of S; the raw-pixel and downsampled-pixel baselines; no LPIPS: its VGG weights are a
download) and drawn with `stellar_tok.visualize` (reconstructions, token swap, localization heat maps).

The table, the verdict against the claim (STELLAR's rFID at or below the downsampled pixels of equal size, PSNR
within 1 dB of reconstruction-only, linear probe above raw pixels and above reconstruction-only) and the pictures
go to the section "Real images at 10x compression (<device>, <minutes> minutes per run[, <tag>])" of docs/RESULTS.md
and to docs/images/real_<device>_<minutes>min[_<tag>]_*.png. A finished training or evaluation is reused when the command runs again with
the same settings. Set STELLAR_TOK_CACHE to reuse the converted FID weights.

A machine without network has no FID weights. Give it a float16 copy without the classifier: 44 MB instead of 96,
and on this set an rFID within 0.1% of the full weights' (286.22 against 286.01 for the 25-minute STELLAR run).
Make the copy where the weights are, then pass `fid_weights=`:

    python -c "from safetensors.torch import load_file, save_file; save_file({k: v.half() for k, v in
      load_file('INCEPTION.safetensors').items() if not k.startswith('fc.')}, 'inception_fp16.safetensors')"
"""
from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from benchmarks.common import ROOT, arg_text, changed_args, fmt, machine, parse_args, run_logged, write_section
from stellar_tok.config import load_config
from stellar_tok.errors import UserError, cli_entry

RESULTS = os.path.join(ROOT, "docs", "RESULTS.md")
IMAGES = os.path.join(ROOT, "docs", "images")
CONFIGS = {"cpu": "configs/tokenizer/emoji64_cpu.yaml", "cuda": "configs/tokenizer/emoji64_gpu.yaml"}
VARIANTS = {"stellar": ("STELLAR", []), "recon_only": ("reconstruction only", ["align.enabled=false"])}
PICTURES = ("reconstructions.png", "token_swap.png", "token_heatmaps.png")
DEFAULT_MINUTES = {"cpu": 20, "cuda": 3}


@dataclass
class RealImagesArgs:
    device: str = "cpu"  # cpu | cuda
    minutes: Optional[float] = None  # per run; default 20 on cpu (process CPU time), 3 on cuda (wall time)
    data: str = "data/emoji64"  # the emoji set's shards (built there when missing)
    seed: int = 0  # train.seed and the evaluation's seed
    n_eval: int = 0  # val images evaluated; 0: all
    jobs: int = 2  # runs at once on the CPU (one thread each); one on a GPU
    out: Optional[str] = None  # default: runs/real_images/<device>_<minutes>min[_<tag>]
    write: bool = True  # the section of docs/RESULTS.md and the pictures under docs/images/
    fid_weights: Optional[str] = None  # an Inception-v3 weights file for rFID (stellar_tok.evaluate fid.weights=); default: its own search
    set: Optional[str] = None  # training overrides for every run, space-separated key=value
    tag: Optional[str] = None  # names a set= variant: its folder, section and pictures
    runs: str = "stellar,recon_only"  # which runs, comma-separated: stellar and optionally recon_only

    @property
    def name(self) -> str:
        """<device>_<minutes>min[_<tag>]: the run folder's, the section's and the pictures' name."""
        return f"{self.device}_{arg_text(self.minutes)}min" + (f"_{self.tag}" if self.tag else "")


def read_args(argv: list[str] | None) -> RealImagesArgs:
    """The arguments, checked, with the defaults that depend on the device filled in and the paths made absolute."""
    args = parse_args("python -m benchmarks.real_images", __doc__, RealImagesArgs, argv, "minutes=25 device=cpu")
    if args.device not in CONFIGS:
        raise UserError(f"device must be one of {', '.join(CONFIGS)} (got {args.device!r})")
    if args.minutes is None:
        args.minutes = float(DEFAULT_MINUTES[args.device])
    if args.set and not args.tag:
        raise UserError("set= changes the runs: name the variant with tag= (it names the output folder, the section and the pictures)")
    if args.tag and not args.tag.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise UserError(f"tag= takes letters, digits, '_', '-' and '.' (got {args.tag!r})")
    runs = args.runs.split(",")
    if set(runs) - set(VARIANTS) or "stellar" not in runs:
        raise UserError(f"runs= takes stellar and optionally recon_only, comma-separated (got {args.runs!r})")
    args.out = os.path.abspath(args.out or os.path.join("runs", "real_images", args.name))
    args.data = os.path.abspath(args.data)
    pixel_values(args)  # a set= key that training would refuse stops here
    if args.device == "cuda":
        args.jobs = 1  # one GPU: one run at a time
    return args


def ensure_data(path: str) -> None:
    if not glob.glob(os.path.join(glob.escape(path), "train-*.tar")):
        print(f"[{time.strftime('%H:%M:%S')}] building the emoji set in {path}", flush=True)
        run_logged([sys.executable, "-m", "stellar_tok.make_emoji", f"out={path}"], os.path.join(os.path.dirname(path) or ".", "make_emoji.log"))


def data_overrides(args: RealImagesArgs) -> list[str]:
    return ["data.name=wds", f"data.path={args.data}"]


def train_cmd(variant: str, args: RealImagesArgs, run_dir: str) -> list[str]:
    budget = "train.max_cpu_minutes" if args.device == "cpu" else "train.max_minutes"
    return [sys.executable, "-m", "stellar_tok.train", f"config={CONFIGS[args.device]}", *data_overrides(args), *VARIANTS[variant][1],
            *(args.set or "").split(), "train.steps=100000", f"{budget}={arg_text(args.minutes)}", f"train.seed={args.seed}",
            f"train.output_dir={run_dir}", "train.resume=auto", "train.progress=false"]


def eval_cmd(args: RealImagesArgs, run_dir: str) -> list[str]:
    return [sys.executable, "-m", "stellar_tok.evaluate", f"tokenizer={run_dir}/tokenizer", *data_overrides(args), "tasks=recon,linear,knn",
            "lpips=none", "baselines=true", f"n_eval={args.n_eval}", "n_train=0", f"seed={args.seed}", f"out={run_dir}/eval",
            f"device={args.device}", "progress=false", *([f"fid.weights={args.fid_weights}"] if args.fid_weights else [])]


def visualize_cmd(args: RealImagesArgs, run_dir: str) -> list[str]:
    return [sys.executable, "-m", "stellar_tok.visualize", f"tokenizer={run_dir}/tokenizer", *data_overrides(args), f"out={run_dir}/pictures",
            f"device={args.device}"]


def run_one(variant: str, args: RealImagesArgs) -> dict:
    """Train, evaluate and draw one variant (each step reused when already done with the same command)."""
    run_dir = os.path.join(args.out, variant)
    os.makedirs(run_dir, exist_ok=True)
    record_path = os.path.join(run_dir, "run.json")
    record = json.load(open(record_path)) if os.path.exists(record_path) else {}
    threads = 1 if args.device == "cpu" else None
    for name, cmd in (("train", train_cmd(variant, args, run_dir)), ("eval", eval_cmd(args, run_dir)), ("pictures", visualize_cmd(args, run_dir))):
        if record.get(name, {}).get("cmd") == cmd[1:]:
            continue
        if name == "train" and "train" in record:
            raise RuntimeError(f"{run_dir} was trained with another command ({record['train']['cmd']}); use another out=")
        print(f"[{time.strftime('%H:%M:%S')}] {name} {variant}", flush=True)
        record[name] = {"cmd": cmd[1:], **run_logged(cmd, os.path.join(run_dir, f"{name}.log"), threads=threads)}
        with open(record_path, "w") as f:
            json.dump(record, f, indent=1)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    report = json.load(open(os.path.join(run_dir, "eval", "metrics.json")))
    return {"record": record, "summary": summary, "report": report, "run_dir": run_dir}


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def verdict(runs: dict) -> list[tuple[str, bool | None, str]]:
    """The claim's four parts: (what, holds (None: the reconstruction-only run was not made), the numbers)."""
    st = runs["stellar"]["report"]["results"]
    s, down, pix = st["stellar"], st["pixels_down"], st["pixels"]
    r = runs["recon_only"]["report"]["results"]["stellar"] if "recon_only" in runs else None
    not_run = (None, "not run (runs=stellar)")
    return [
        ("rFID at or below the downsampled pixels of equal size", s["rfid"] <= down["rfid"], f"{s['rfid']:.2f} against {down['rfid']:.2f}"),
        ("PSNR within 1 dB of reconstruction only", *((s["psnr"] >= r["psnr"] - 1.0, f"{s['psnr']:.2f} dB against {r['psnr']:.2f} dB "
                                                       f"({s['psnr'] - r['psnr']:+.2f})") if r else not_run)),
        ("linear probe (mean of S) above raw pixels", s["linear_tokens"] > pix["linear_pixels"], f"{s['linear_tokens']:.2f}% against {pix['linear_pixels']:.2f}%"),
        ("linear probe (mean of S) above reconstruction only", *((s["linear_tokens"] > r["linear_tokens"],
                                                                  f"{s['linear_tokens']:.2f}% against {r['linear_tokens']:.2f}%") if r else not_run)),
    ]


def pixel_values(args: RealImagesArgs) -> int:
    """Numbers in one image of the configuration with the `set=` overrides (3 x image_size²), read by the training
    command's own loader: a `set=` key that training would refuse is refused here, before any run."""
    try:
        cfg = load_config([f"config={os.path.join(ROOT, CONFIGS[args.device])}", *(args.set or "").split()])
    except UserError as e:
        raise UserError(f"set=: {e}") from None
    return 3 * int(cfg.model.image_size) ** 2


def table(runs: dict, args: RealImagesArgs, values: int) -> str:
    """The runs' rows and the two pixel baselines; `values`: pixel values per image (`pixel_values`)."""
    budget = "CPU min (process)" if args.device == "cpu" else "GPU min (wall)"
    lines = [f"| | steps × batch | {budget} | PSNR (dB) | SSIM | rFID | linear, mean of S | kNN, mean of S | linear, CLS |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, run in runs.items():
        label = VARIANTS[variant][0]
        m, t = run["report"]["results"]["stellar"], run["record"]["train"]
        minutes = t["cpu_s"] / 60 if args.device == "cpu" else t["wall_s"] / 60
        lines.append(f"| {label} | {run['summary']['step']:,} × {run['summary']['images_seen'] // max(1, run['summary']['step'])} | {minutes:.1f} | {fmt(m.get('psnr'))} | "
                     f"{fmt(m.get('ssim'), 3)} | {fmt(m.get('rfid'))} | {fmt(m.get('linear_tokens'))} | {fmt(m.get('knn_tokens'))} | {fmt(m.get('linear_cls'))} |")
    res = runs["stellar"]["report"]["results"]
    down, pix = res["pixels_down"], res["pixels"]
    lines.append(f"| pixels, downsampled to the latent's size | | | {fmt(down.get('psnr'))} | {fmt(down.get('ssim'), 3)} | {fmt(down.get('rfid'))} | – | – | – |")
    lines.append(f"| raw pixels ({values:,} values) | | | | | | {fmt(pix.get('linear_pixels'))} | {fmt(pix.get('knn_pixels'))} | |")
    return "\n".join(lines)


def pictures(runs: dict, args: RealImagesArgs) -> list[str]:
    """docs/images/real_<device>_<minutes>min[_<tag>]_<variant>_<picture>.png, copied from each run's visualize output."""
    os.makedirs(IMAGES, exist_ok=True)
    copied = []
    for variant in runs:
        for name in PICTURES:
            src = os.path.join(runs[variant]["run_dir"], "pictures", name)
            if os.path.exists(src):
                dst = os.path.join(IMAGES, f"real_{args.name}_{variant}_{name}")
                shutil.copyfile(src, dst)
                copied.append(os.path.relpath(dst, ROOT))
    return copied


def command_line(args: RealImagesArgs) -> str:
    default_minutes = f"minutes={DEFAULT_MINUTES[args.device]}"
    extra = [e for e in changed_args(args, ["device", "minutes", "seed", "n_eval", "runs", "tag", "set"]) if e != default_minutes]
    return "STELLAR_TOK_CACHE=runs/eval/cache python -m benchmarks.real_images" + "".join(f" {shlex.quote(e)}" for e in extra)


def report_body(runs: dict, args: RealImagesArgs, copied: list[str]) -> str:
    st = runs["stellar"]["report"]
    n_eval, n_train = st["data"]["n_eval"], st["data"]["n_train"]
    values = pixel_values(args)
    changed = f" with `{args.set}`" if args.set else ""
    minutes = arg_text(args.minutes)
    budget = (f"{minutes} minutes of process CPU time each, one thread per run, {args.jobs} at once" if args.device == "cpu"
              else f"{minutes} minutes of wall time each, one after the other")
    checks = verdict(runs)
    lines = [f"```bash\n{command_line(args)}\n```", "",
             f"{machine()}. `{CONFIGS[args.device]}`{changed} on the emoji set (`python -m stellar_tok.make_emoji`: Noto Color Emoji "
             f"drawings, 64 px, 9 classes), seed {args.seed}, {budget}. The latent holds {st['tokenizer']['latent_values']:,} numbers "
             f"(r·c + N·r) for {values:,} pixel values ({values / st['tokenizer']['latent_values']:.1f}x). Evaluation: every one of the "
             f"{n_eval} val images; probes trained on the {n_train} train images; no LPIPS (its VGG weights are a download); "
             f"{st['protocol']['pixels_down']}.", "", table(runs, args, values), "",
             "The claim at this scale, part by part:", ""]
    lines += [f"- {what}: **{'yes' if ok else 'no'}** ({numbers})" if ok is not None else f"- {what}: {numbers}" for what, ok, numbers in checks]
    if copied:
        lines += ["", "Pictures (visualize: rows input / reconstruction / arg-max token map; token swap: S of one image with L of another; "
                      "heat maps: the columns of L): " + ", ".join(f"`{p}`" for p in copied)]
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = read_args(argv)
    ensure_data(args.data)
    start = time.time()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {v: pool.submit(run_one, v, args) for v in args.runs.split(",")}
        runs = {v: f.result() for v, f in futures.items()}
    print(f"all runs done in {(time.time() - start) / 60:.1f} min", flush=True)
    copied = pictures(runs, args) if args.write else []
    body = report_body(runs, args, copied)
    if args.write:
        variant = f", {args.tag}" if args.tag else ""
        write_section(f"Real images at 10x compression ({args.device}, {arg_text(args.minutes)} minutes per run{variant})", body, doc=RESULTS)
    print(body)
    return runs


if __name__ == "__main__":
    main()
