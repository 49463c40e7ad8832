"""The models, above the operators and below the pipeline: they import ``ops``, ``checkpoint`` and ``errors`` only.

    base         PatchEmbed, GradCheckpointing, MaskedImageModel (what the masked autoencoders share)
    pos_embed    fixed 2-D sin-cos position tables and their resizing
    crate        CRATE-MAE: its layers (MSSA, ISTA, encoder and decoder blocks) and the model, CRATEMAE
    crate_supervised  the release's supervised CRATE (CRATE, crate_tiny ... crate_large) from the same layers
    vit_mae      ViT-MAE, FAIR's masked autoencoder (the paper's baseline)
    classifier   classifiers from a pretrained encoder (CRATEClassifier, ViTClassifier)
    registry     every pretraining architecture by name (MODELS) and build_mae
    pretrained   checkpoints: load_checkpoint, clean_state_dict, load_pretrained (which architecture a file holds),
                 supervised_classifier (a supervised CRATE from one, at another size or class count)
    hub          save_pretrained / from_pretrained / push_to_hub (huggingface_hub, the optional extra ``hub``)
"""
