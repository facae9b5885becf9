// Host stand-in for the TFLM Arduino library's header: the TFLM tree is on
// the include path instead.
