"""Train the classic VAE on the MNIST digits that ship with minivae, then look at what it learned.

    python examples/train_mnist.py                  # figures into runs/examples/train_mnist/
    python examples/train_mnist.py /tmp/my_run      # or wherever you like

The same as `minivae train`, written out with the library so each step is visible.
About 10-30 s on 2 CPU cores.
"""
import sys

from minivae.data import load_dataset
from minivae.evaluate import evaluate
from minivae.train import TrainConfig, Trainer

out = sys.argv[1] if len(sys.argv) > 1 else "runs/examples/train_mnist"

# 1. Data: 10,000 real MNIST digits bundled with minivae, split 9,000 train / 1,000 test.
#    Each image is 28 x 28 grey levels flattened to 784 numbers in [0, 1].
ds = load_dataset("mnist10k")
print(ds)

# 2. The model and the optimisation: the setup of the PyTorch example VAE.
#    784 -> 400 -> (mu, logvar) of a 20-d Gaussian q(z|x) -> z -> 400 -> 784 Bernoulli logits.
#    Each step minimises mean(-ELBO) = mean(reconstruction + KL) over a batch of 128.
config = TrainConfig(hidden=[400], latent=20, optimizer="adam", lr=1e-3, batch_size=128,
                     epochs=10, seed=0, out=out)
trainer = Trainer(config, dataset=ds)
print(f"{trainer.model.n_params():,} parameters, {trainer.steps_per_epoch} steps per epoch")

# 3. Train. Every epoch: the test loss (-ELBO, nats per example), a checkpoint and metrics.json.
#    Ctrl-C stops cleanly; `minivae train --resume --out <dir>` continues.
trainer.fit()

# 4. A tighter number than the ELBO: the importance-weighted bound with k = 100 samples per
#    digit. -IWAE_k is an upper bound on -log p(x) that shrinks as k grows.
result = evaluate(trainer.model, ds.x_test, k=100)
print(f"test: -ELBO {result['loss']:.2f} nats  (recon {result['recon']:.2f} + KL {result['kl']:.2f}),"
      f"  -IWAE_100 {result['nll_100']:.2f} nats")

# 5. The figures are in the run directory: reconstructions.png (inputs above their
#    reconstructions), samples.png (decoded draws from the prior), latent.png (test codes,
#    first two principal components, coloured by digit) and curves.png (loss per epoch).
print(f"figures and metrics in {out}/")
