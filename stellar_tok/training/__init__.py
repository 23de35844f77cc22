"""How a run trains: the loop, budgets, guards and checkpoints shared by the tokenizer's and the generator's
trainers (`engine`, `budget`, `guards`, `checkpoint`), the module a tokenizer run optimises (`objective`) and
what tokenizer training does besides its steps (`tokenizer_setup`)."""
