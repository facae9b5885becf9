"""The model graph: reading/writing `.tflite` (`tflite_model`), which runs of ops a patch stage may hold (`rules`), rewriting them into KP_PATCH_STAGE ops (`patchify`) and back (`unpatchify`)."""
