"""The tutorial's experiment with resnet_fast: ResNet-34 (or ResNet-50, ...) on MNIST.

Adam, learning rate 1e-4, batch 128, 20 epochs, then test accuracy, as the tutorial trains it:

    python examples/mnist_resnet.py --data ~/data                       # train files present
    python examples/mnist_resnet.py --data ../shared/data/mnist --holdout 2000 --arch resnet50

`--holdout N` is for a folder that holds only the t10k test files: train on the first 10000-N test
digits, evaluate on the last N. `resnet-fast train-mnist` (or `resnet-fast train --dataset mnist`) is
the same experiment with every option; `resnet-fast train --data DIR` trains on a folder of images.
"""

from __future__ import annotations

import argparse

import torch

import resnet_fast
from resnet_fast.data import mnist_train_test, to_float
from resnet_fast.tools.train import ARCHS, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="folder with the MNIST files")
    parser.add_argument("--arch", choices=ARCHS, default="resnet34")
    parser.add_argument("--holdout", type=int, default=None, metavar="N")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # 28x28 single-channel digits, scaled to [0, 1] and normalised with MNIST's mean and std.
    (x_train, y_train), (x_test, y_test) = mnist_train_test(args.data, holdout=args.holdout)
    train = (to_float(x_train).to(device), y_train.to(device))
    test = (to_float(x_test).to(device), y_test.to(device))

    # torchvision's ResNet with a 1-channel stem and 10 classes; same state_dict keys as torchvision's.
    torch.manual_seed(0)
    model = resnet_fast.BUILDERS[args.arch](in_channels=1, num_classes=10).to(device)

    summary = fit(model, train, test, epochs=args.epochs, batch_size=128, lr=1e-4, optimizer="adam")
    print(f"{args.arch}: test accuracy {summary['test_accuracy']:.2%} on {len(y_test)} digits")


if __name__ == "__main__":
    main()
