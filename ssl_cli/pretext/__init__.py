"""The self-supervised methods by family (handcrafted, contrastive, clustering, reconstructive) and their parts."""
