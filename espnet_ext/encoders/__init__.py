"""espnet_ext encoders (AbsEncoder subclasses), registered by
:mod:`espnet_ext.registry`."""
