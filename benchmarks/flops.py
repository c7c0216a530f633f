"""Floating-point operations per image of kad's extractor networks, counted from the graph.

Every convolution, depthwise convolution and dense layer of the Keras model counts two
operations (a multiply and an add) per multiply-accumulate; batch normalisation, which
inference folds into the convolutions, activations, pooling and additions are left out
(under 2 % for these networks). Divide by the measured time per image and by the CPU's
peak to see how close a runtime gets to the hardware (``benchmarks/README.md``).

Run from the repository root::

    python benchmarks/flops.py
    python benchmarks/flops.py --networks inception_v3@299 mobilenet_v2:alpha=0.35@224
"""

from __future__ import annotations

import argparse

DEFAULT = ("inception_resnet_v2@299", "inception_v3@299", "mobilenet_v2:alpha=0.35@224")


def count_flops(model) -> int:
    """Two times the multiply-accumulates of the model's convolutions and dense layers."""
    import keras

    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            macs += h * w * c * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            macs += h * w * c_out * kh * kw * c_in // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            macs += layer.input.shape[-1] * layer.units
    return 2 * int(macs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(DEFAULT),
                        help="BACKBONE@SIZE (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="one small network at 32 px, in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.networks = ["mobilenet_v2:alpha=0.35@32"]
    from kad.features.backbones import get_backbone

    for item in args.networks:
        spec, _, size = item.rpartition("@")
        model, _ = get_backbone(spec).build_extractor(int(size), "none")
        print(f"{spec} @{size}px: {count_flops(model) / 1e9:.3f} GFLOP per image")


if __name__ == "__main__":
    main()
