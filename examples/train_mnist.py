"""Train the classic VAE on the MNIST digits that ship with minivae, then look at what it learned.

    python examples/train_mnist.py                  # figures into runs/examples/train_mnist/
    python examples/train_mnist.py /tmp/my_run      # or wherever you like
    python examples/train_mnist.py --quick          # 1 epoch on 2,000 digits: a smoke test

The same as `minivae train`, written out with the library so each step is visible.
About 5 s on 2 CPU cores (--quick: under 2 s), whole command.
"""
import argparse
import dataclasses
import os
import sys

from minivae.data import load_dataset
from minivae.engine.threads import one_blas_thread
from minivae.evaluate import evaluate
from minivae.train import TrainConfig, Trainer

QUICK_TRAIN = 2000   # --quick: training digits used (of 9,000), for 1 epoch


def run(out: str, quick: bool = False) -> dict:
    """Train, evaluate and draw the figures into ``out``. -> the evaluation's numbers."""
    # 1. Data: 10,000 real MNIST digits bundled with minivae, split 9,000 train / 1,000 test.
    #    Each image is 28 x 28 grey levels flattened to 784 numbers in [0, 1].
    ds = load_dataset("mnist10k")
    if quick:
        ds = dataclasses.replace(ds, x_train=ds.x_train[:QUICK_TRAIN], y_train=ds.y_train[:QUICK_TRAIN])
    print(ds)

    # 2. The model and the optimisation: the setup of the PyTorch example VAE.
    #    784 -> 400 -> (mu, logvar) of a 20-d Gaussian q(z|x) -> z -> 400 -> 784 Bernoulli logits.
    #    Each step minimises mean(-ELBO) = mean(reconstruction + KL) over a batch of 128.
    config = TrainConfig(hidden=[400], latent=20, optimizer="adam", lr=1e-3, batch_size=128,
                         epochs=1 if quick else 10, seed=0, out=out)
    trainer = Trainer(config, dataset=ds)
    print(f"{trainer.model.n_params():,} parameters, {trainer.steps_per_epoch} steps per epoch")

    # 3. Train. Every epoch: the test loss (-ELBO, nats per example), a checkpoint and metrics.json.
    #    Ctrl-C stops cleanly; `minivae train --resume --out <dir>` continues.
    trainer.fit()

    # 4. A tighter number than the ELBO: the importance-weighted bound with k = 100 samples per
    #    digit (--quick: k = 10). -IWAE_k is an upper bound on -log p(x) that shrinks as k grows.
    k = 10 if quick else 100
    result = evaluate(trainer.model, ds.x_test, k=k)
    print(f"test: -ELBO {result['loss']:.2f} nats  (recon {result['recon']:.2f} + KL {result['kl']:.2f}),"
          f"  -IWAE_{k} {result[f'nll_{k}']:.2f} nats" + ("  (--quick: 1 short epoch, rough)" if quick else ""))

    # 5. The figures are in the run directory: reconstructions.png (inputs above their
    #    reconstructions), samples.png (decoded draws from the prior), latent.png (test codes,
    #    first two principal components, coloured by digit) and curves.png (loss per epoch).
    print(f"figures and metrics in {out}/")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", default=os.path.join("runs", "examples", "train_mnist"),
                   help="run directory for the checkpoint, metrics and figures "
                        "(default: runs/examples/train_mnist)")
    p.add_argument("--quick", action="store_true",
                   help=f"1 epoch on {QUICK_TRAIN:,} training digits, -IWAE with k = 10 (a smoke test)")
    args = p.parse_args(argv)
    # One BLAS thread, as `minivae train` uses: OpenBLAS's own threads busy-wait between the
    # products and slow a shared machine down (minivae.engine.threads explains).
    with one_blas_thread():
        run(args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
