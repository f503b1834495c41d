"""espnet_ext decoders (AbsDecoder subclasses), registered by
:mod:`espnet_ext.registry`."""
