"""On real MNIST digits: FP32 training, calibration-only quantization, then a short QAT fine-tune."""

import qat_plugin as qp
from qat_plugin.models import compile_classifier, small_residual_cnn


def test_quantized_accuracy_stays_within_a_point_of_fp32(mnist):
    x_train, y_train, x_test, y_test = mnist
    model = compile_classifier(small_residual_cnn(seed=0))
    model.fit(x_train, y_train, batch_size=32, epochs=3, verbose=0)
    fp32 = model.evaluate(x_test, y_test, verbose=0)[1]
    assert fp32 > 0.9

    qmodel = qp.quantize_model(model, calibration_data=x_train[:512])
    compile_classifier(qmodel, learning_rate=1e-4)
    calibrated = qmodel.evaluate(x_test, y_test, verbose=0)[1]
    qmodel.fit(x_train, y_train, batch_size=32, epochs=1, verbose=0)
    qat = qmodel.evaluate(x_test, y_test, verbose=0)[1]
    assert calibrated >= fp32 - 0.01, (fp32, calibrated)
    assert qat >= fp32 - 0.01, (fp32, qat)
    # Calibration ranges are not touched by training; weight ranges follow the kernel.
    assert all(i.calibrated for i in qp.list_quantizers(qmodel))
