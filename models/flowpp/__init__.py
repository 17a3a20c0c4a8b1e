"""Flow++ variational dequantiser (Ho et al. 2019) as score_flow uses it (Song et al. 2021, Appendix).

``dequantizer.Dequantizer`` (CIFAR-10) and ``dequantizer_imagenet32.Dequantizer`` (ImageNet 32×32; chosen by
``config.deq.arch``) map Gaussian noise ``eps`` and an image ``x`` in [0, 1] to dequantisation
noise ``u`` in (0, 1) and ``-log q(u | x)``; ``logistic`` holds the mixture-of-logistics densities,
``layers`` the data-dependently initialised convolutions, attention and gates, ``flows`` the invertible
steps. Parameter names and shapes are score_flow's (``models/flowpp/`` there), so its checkpoints load.
"""
