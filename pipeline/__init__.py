"""The lopt Kubeflow pipeline and the ``lopt`` command line."""
