"""ResNet-8 (the MLPerf Tiny image-classification model) in Keras 3, for the benchmarks.

    from _resnet8 import resnet8   # with benchmarks/ on sys.path
    model = resnet8(seed=0)        # logits, compile with from_logits=True

`benchmarks/_tfmot_peer.py` builds the same graph from this function with
`keras_module=tf_keras` (Keras 2) for TFMOT, so both sides of the QAT
comparison train exactly the same network.

Differences from the MLPerf Tiny reference, both deliberate: the input is
MNIST-sized (28, 28, 1) rather than CIFAR's (32, 32, 3), and the head emits
logits (no softmax) because the benchmarks compile with `from_logits=True`;
GlobalAveragePooling2D stands in for its AveragePooling2D(pool=full map) +
Flatten, which computes the same thing. With a 3-channel 32x32 input this
has the reference's 78,666 parameters; with (28, 28, 1) it has 78,378.
"""

from __future__ import annotations

from types import ModuleType

# MLPerf Tiny's ResNet-8 regularises every conv kernel with L2(1e-4) and uses
# he_normal init; kept so the model is the published one, not a look-alike.
_L2 = 1e-4


def resnet8(
    input_shape: tuple[int, int, int] = (28, 28, 1),
    classes: int = 10,
    seed: int | None = None,
    keras_module: ModuleType | None = None,
):
    """Conv16-BN-ReLU, three residual stacks (16/32/64 filters, strides 1/2/2), GAP, Dense.

    `keras_module`: Keras 3 (`keras`, the default) or Keras 2 (`tf_keras`, for TFMOT).

    >>> resnet8().count_params()
    78378
    """
    if keras_module is None:
        import keras as keras_module
    keras = keras_module
    if seed is not None:
        keras.utils.set_random_seed(seed)
    L = keras.layers

    def conv(filters: int, kernel: int, strides: int, name: str):
        return L.Conv2D(
            filters, kernel, strides=strides, padding="same", kernel_initializer="he_normal",
            kernel_regularizer=keras.regularizers.L2(_L2), name=name,
        )

    inp = keras.Input(input_shape, name="image")
    x = conv(16, 3, 1, "conv1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    for i, (filters, strides) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        s = f"stack{i}"
        y = conv(filters, 3, strides, f"{s}_conv1")(x)
        y = L.BatchNormalization(name=f"{s}_bn1")(y)
        y = L.ReLU(name=f"{s}_relu1")(y)
        y = conv(filters, 3, 1, f"{s}_conv2")(y)
        y = L.BatchNormalization(name=f"{s}_bn2")(y)
        if strides > 1:
            # Projection shortcut only where the shape changes, as in MLPerf Tiny.
            x = conv(filters, 1, strides, f"{s}_shortcut")(x)
        x = L.Add(name=f"{s}_add")([x, y])
        x = L.ReLU(name=f"{s}_relu2")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, L.Dense(classes, name="head")(x), name="resnet8")
