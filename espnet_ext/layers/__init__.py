"""Building blocks shared by espnet_ext's encoders and decoders."""
