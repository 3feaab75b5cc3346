"""Small reference models for demos, recipes, tests and benchmarks.

Each builder takes `keras_module` (default: Keras 3) so the TFMOT benchmark peer
can build the very same graph with `tf_keras`.
"""

from __future__ import annotations

from types import ModuleType


def _keras(keras_module: ModuleType | None, seed: int | None) -> ModuleType:
    if keras_module is None:
        import keras as keras_module
    if seed is not None:
        keras_module.utils.set_random_seed(seed)
    return keras_module


def small_residual_cnn(input_shape=(28, 28, 1), classes: int = 10, seed: int | None = None, keras_module: ModuleType | None = None):
    """Conv-BN-ReLU, max-pool, a residual add, a strided conv and a dense head (logits).

    Every quantizable kind the TensorRT recipe cares about in one small
    network: it reaches ~96% on 8,000 MNIST digits in three epochs on a CPU.

    >>> small_residual_cnn().count_params()
    22858
    """
    keras = _keras(keras_module, seed)
    L = keras.layers
    inp = keras.Input(input_shape, name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.MaxPooling2D(name="pool1")(x)
    y = L.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = L.Add(name="add")([x, y])
    x = L.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="conv3")(x)
    x = L.Flatten(name="flatten")(x)
    return keras.Model(inp, L.Dense(classes, name="head")(x), name="small_residual_cnn")


def resnet8(input_shape=(28, 28, 1), classes: int = 10, seed: int | None = None, keras_module: ModuleType | None = None):
    """ResNet-8 as in MLPerf Tiny: conv16-BN-ReLU, three residual stacks (16/32/64, strides 1/2/2), GAP, dense.

    he_normal init and L2(1e-4) on conv kernels as in the reference; logits
    out. With a 32x32x3 input it has the reference's 78,666 parameters.

    >>> resnet8().count_params()
    78378
    """
    keras = _keras(keras_module, seed)
    L = keras.layers

    def conv(filters: int, kernel: int, strides: int, name: str):
        return L.Conv2D(filters, kernel, strides=strides, padding="same", kernel_initializer="he_normal",
                        kernel_regularizer=keras.regularizers.L2(1e-4), name=name)

    inp = keras.Input(input_shape, name="image")
    x = L.ReLU(name="relu1")(L.BatchNormalization(name="bn1")(conv(16, 3, 1, "conv1")(inp)))
    for i, (filters, strides) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        s = f"stack{i}"
        y = L.ReLU(name=f"{s}_relu1")(L.BatchNormalization(name=f"{s}_bn1")(conv(filters, 3, strides, f"{s}_conv1")(x)))
        y = L.BatchNormalization(name=f"{s}_bn2")(conv(filters, 3, 1, f"{s}_conv2")(y))
        if strides > 1:  # projection shortcut only where the shape changes
            x = conv(filters, 1, strides, f"{s}_shortcut")(x)
        x = L.ReLU(name=f"{s}_relu2")(L.Add(name=f"{s}_add")([x, y]))
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, L.Dense(classes, name="head")(x), name="resnet8")


def depthwise_cnn(input_shape=(28, 28, 1), classes: int = 10, seed: int | None = None, keras_module: ModuleType | None = None):
    """A MobileNetV2-style net: inverted residual blocks (expand 1x1, depthwise 3x3, project 1x1).

    >>> depthwise_cnn().count_params()
    13738
    """
    keras = _keras(keras_module, seed)
    L = keras.layers

    def block(x, filters: int, strides: int, name: str):
        expanded = x.shape[-1] * 4
        y = L.ReLU(6.0, name=f"{name}_expand_relu")(L.BatchNormalization(name=f"{name}_expand_bn")(
            L.Conv2D(expanded, 1, use_bias=False, name=f"{name}_expand")(x)))
        y = L.ReLU(6.0, name=f"{name}_dw_relu")(L.BatchNormalization(name=f"{name}_dw_bn")(
            L.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False, name=f"{name}_dw")(y)))
        y = L.BatchNormalization(name=f"{name}_project_bn")(L.Conv2D(filters, 1, use_bias=False, name=f"{name}_project")(y))
        return L.Add(name=f"{name}_add")([x, y]) if strides == 1 and x.shape[-1] == filters else y

    inp = keras.Input(input_shape, name="image")
    x = L.ReLU(6.0, name="stem_relu")(L.BatchNormalization(name="stem_bn")(
        L.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)))
    x = block(x, 16, 1, "block1")
    x = block(x, 24, 2, "block2")
    x = block(x, 24, 1, "block3")
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, L.Dense(classes, name="head")(x), name="depthwise_cnn")


def compile_classifier(model, learning_rate: float = 1e-3):
    """Compile with Adam, sparse categorical cross-entropy on logits, and accuracy.

    >>> compile_classifier(small_residual_cnn()).compiled
    True
    """
    import keras

    model.compile(
        keras.optimizers.Adam(learning_rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model
