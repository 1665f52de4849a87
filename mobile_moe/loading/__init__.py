"""Loading a model, apart from running it: checkpoints and hub ids, the memory plan, quantizing, and the expert stores."""
