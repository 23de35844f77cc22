"""What a trained tokenizer is measured and shown with: PSNR/SSIM (`metrics`), FID features and statistics (`fid`,
`fid_reference`), linear and kNN probes (`probing`, `augmented_probe`, their images in `probe_images`, a whole run
in `probe_run`), the evaluation run of `stellar_tok.evaluate` (`tokenizer_eval`, with `recon_meter`, `feature_cache`
and `report`), image grids (`pictures`) and figures (`figures`). The held-out images they read:
`stellar_tok.data.reference`."""
