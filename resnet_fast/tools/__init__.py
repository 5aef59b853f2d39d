"""The user's commands, apart from the library: the `resnet-fast` CLI (cli), bench, validate, export,
train and train_images (training), info and explain, and their timing harness (timing). The library
core (models, nn, ops, kernels, fold, data, the extension) never imports this package."""
