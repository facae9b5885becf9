"""The Keras side: the `PatchStage` layer, wrapping layers of an existing model into stages (`wrap`) and the int8 export (`export`)."""
