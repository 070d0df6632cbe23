"""A test-only node pack copied into the test server: a third-party node that emits malformed IMAGE tensors,
so the tests can check how MMR1's nodes report them."""

import torch

SHAPES = {
    "channels first [B,3,H,W]": (1, 3, 32, 32),
    "no batch [H,W,3]": (32, 32, 3),
    "five channels [B,H,W,5]": (1, 32, 32, 5),
    "empty batch [0,H,W,3]": (0, 32, 32, 3),
}


class MMR1TestMalformedImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"shape": (list(SHAPES),)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, shape):
        return (torch.rand(SHAPES[shape]),)


NODE_CLASS_MAPPINGS = {"MMR1TestMalformedImage": MMR1TestMalformedImage}
