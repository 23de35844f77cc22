"""The report of `stellar_tok.evaluate` as a Markdown table: one row per model (the tokenizer, the pixel baselines),
only the columns that have a value, rFID / rKID headed with the images they were measured on, and the protocol
below (written to out/metrics.md and printed)."""
from __future__ import annotations

ROW_NAMES = {"stellar": "STELLAR tokenizer", "pixels_down": "pixels, downsampled to the latent's size", "pixels": "raw pixels"}
COLUMNS = [("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 4), ("lpips", "LPIPS", 4), ("rfid", "rFID", 2), ("rkid", "rKID", 4),
           ("linear_tokens", "linear S-mean", 2), ("linear_cls", "linear CLS", 2), ("linear_lowrank", "linear L·S", 2), ("linear_pixels", "linear pixels", 2),
           ("knn_tokens", "kNN S-mean", 2), ("knn_cls", "kNN CLS", 2), ("knn_lowrank", "kNN L·S", 2), ("knn_pixels", "kNN pixels", 2)]


def _pixel_probes(report: dict) -> str:
    """Where the pixel baselines' probes read a subset of their own: its size, in words."""
    r = report["results"].get("pixels") or {}
    if "probe_n_train" not in r or report["protocol"].get("pixel_probes") == "the probes' own images":
        return ""
    return (f"; pixel probes on {r['probe_n_train']:,} train / {r['probe_n_eval']:,} held-out images (seeded subsets spread "
            "over the classes, baseline_n)")


def markdown_table(report: dict) -> str:
    """The results as a Markdown table (only the columns that have a value), with the protocol below."""
    res = report["results"]
    cols = [c for c in COLUMNS if any(c[0] in r for r in res.values())]

    def header(key: str, name: str) -> str:  # rFID / rKID with the images they were measured on
        if key in ("rfid", "rkid"):
            r = next(r for r in res.values() if key in r)
            return f"{name} ({r.get('rfid_split', 'val')}, n={r.get('rfid_n_eval', report['data']['n_eval'])})"
        return name

    lines = ["| | " + " | ".join(header(c[0], c[1]) for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in res.items():
        cells = [f"{r[c[0]]:.{c[2]}f}" if c[0] in r else "–" for c in cols]
        lines.append(f"| {ROW_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    p, d = report["protocol"], report["data"]
    train = f"{d['n_train']} train images" + (f" ({d['probe_train']})" if d.get("probe_train") else "")
    lines += ["", f"Held-out: {d['n_eval']} images, {d.get('held_out') or 'val split'} ({d['val']['name']}); probes trained on {train}. "
              f"Tokenizer {report['tokenizer']['fingerprint']}: r = {report['tokenizer']['num_tokens']}"
              f"{' (dense decoder: reads all N patch features)' if report['tokenizer'].get('decoder_input') == 'dense' else ''}, {report['tokenizer']['latent_values']} latent values; "
              f"baseline: {p['pixels_down']}{_pixel_probes(report)}. LPIPS: {p['lpips']}. FID extractor: {p['fid_extractor']}. "
              f"{report['seconds'].get('total')} s.", ""]
    return "\n".join(lines)
