"""What a trained tokenizer is measured and shown with: PSNR/SSIM (`metrics`), FID features and statistics (`fid`,
`fid_reference`), linear and kNN probes (`probing`) and image grids (`pictures`)."""
