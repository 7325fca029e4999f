"""The SAE itself (a TopK sparse autoencoder), its files (native, imported) and the concept library stored in them."""
