"""How a run trains: the loop, budgets, guards and checkpoints shared by the tokenizer's and the generator's
trainers (`engine`, `budget`, `guards`, `checkpoint`); the tokenizer's trainer (`tokenizer_trainer`: its step and
the run's set-up), the module it optimises (`objective`), where its weights come from and its export
(`tokenizer_weights`), and the checks of a run's files before it starts (`preflight`)."""
