"""The tokenizer itself: the ViT blocks (`vit`), the tokenizer's forward pass from pixels to F = L·S and back
(`tokenizer`), its latent (`latent`), and readers of weights trained elsewhere (`mae_init`). Imports no data and
no training code."""
