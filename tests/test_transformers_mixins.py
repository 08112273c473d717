"""transformers' ConfigTester, ModelTesterMixin and ImageProcessingTestMixin run against MROVSeg.

Every skipped common test carries its reason next to it.
"""

import unittest

import numpy as np
import torch

from modeling_mrovseg import (
    MROVSegConfig,
    MROVSegForOpenVocabSegmentation,
    MROVSegImageProcessor,
    MROVSegModel,
    MROVSegModelOutput,
    MROVSegOutput,
)
from tests.helpers import tiny_config
from tests.transformers_common import load

config_common = load("test_configuration_common")
modeling_common = load("test_modeling_common")
image_common = load("test_image_processing_common")


# ---------------------------------------------------------------- model
class MROVSegModelTester:
    def __init__(self, parent, batch_size=2, height=96, width=150):
        self.parent = parent
        self.batch_size = batch_size
        self.height, self.width = height, width
        self.is_training = True
        config = self.get_config()
        self.num_hidden_layers = config.vision_config.num_hidden_layers
        self.expected_num_hidden_layers = self.num_hidden_layers  # the last layer runs on the queries only
        self.seq_length = 1 + (config.slice_size // config.patch_size) ** 2
        self.hidden_size = config.vision_config.hidden_size

    def get_config(self):
        # two CLIP layers (the common suite insists on at most two): tap layer 1, the queries run through layer 2
        config = tiny_config(feature_layers=[1], query_layer=1)
        config.vision_config.num_hidden_layers = 2
        return MROVSegConfig.from_dict(config.to_dict())

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        processor = MROVSegImageProcessor.from_model_config(config, size={"height": self.height, "width": self.width})
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (self.height, self.width, 3), dtype=np.uint8) for _ in range(self.batch_size)]
        inputs = dict(processor(images, return_tensors="pt"))
        return config, inputs

    def prepare_config_and_inputs(self):
        return self.prepare_config_and_inputs_for_common()


class MROVSegModelTest(modeling_common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (MROVSegModel, MROVSegForOpenVocabSegmentation)
    has_attentions = False  # masked attention returns no attention maps: SDPA, never materialised
    test_resize_embeddings = False  # image model: no token embeddings to resize
    test_torch_exportable = False  # the export suite is not in the sdist (see tests/transformers_common.py)
    test_mismatched_shapes = False  # no classification head whose size depends on num_labels
    _is_composite = True  # CLIP vision and text sub-configs

    def setUp(self):
        self.model_tester = MROVSegModelTester(self)
        kwargs = {k: v for k, v in self.model_tester.get_config().to_diff_dict().items()
                  if k not in ("id2label", "label2id")}
        self.config_tester = config_common.ConfigTester(
            self, config_class=MROVSegConfig, has_text_modality=False,
            common_properties=["projection_dim", "num_queries", "hidden_dim"], **kwargs)

    def test_config(self):
        self.config_tester.run_common_tests()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = dict(inputs_dict)
        if return_labels and model_class is MROVSegForOpenVocabSegmentation:
            # per-image seeds make the loss's point sampling reproducible, so two calls agree exactly
            inputs_dict["loss_seeds"] = torch.arange(inputs_dict["pixel_values"].shape[0])
            valid_h, valid_w, height, width = inputs_dict["image_sizes"][0].tolist()
            labels = torch.full((inputs_dict["pixel_values"].shape[0], height, width), 255)
            labels[:, :valid_h, :valid_w] = torch.randint(0, 3, (labels.shape[0], valid_h, valid_w),
                                                          generator=torch.Generator().manual_seed(0))
            inputs_dict["labels"] = labels
        return inputs_dict

    def _head_only(self, test):
        """transformers' training tests skip base models by looking them up in its own MODEL_MAPPING, which does not
        list MROVSegModel; the base model has no loss, so those tests run on the head only."""
        classes = self.all_model_classes
        self.all_model_classes = (MROVSegForOpenVocabSegmentation,)
        try:
            test()
        finally:
            self.all_model_classes = classes

    def test_training(self):
        self._head_only(super().test_training)

    def test_training_gradient_checkpointing(self):
        self._head_only(super().test_training_gradient_checkpointing)

    def test_training_gradient_checkpointing_use_reentrant_false(self):
        self._head_only(super().test_training_gradient_checkpointing_use_reentrant_false)

    def test_training_gradient_checkpointing_use_reentrant_true(self):
        self._head_only(super().test_training_gradient_checkpointing_use_reentrant_true)

    @unittest.skip("Image model: the input embedding is CLIP's patch convolution, not an nn.Embedding (as for ViT).")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip("hidden_states are the global-view slice of MROVSeg's own backbone pass, read after it; they are not "
                   "inputs of later computation, so they cannot retain gradients.")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip("MROVSeg runs the CLIP layers in its own backbone pass (global view + slices), not through "
                   "transformers' output-capturing hooks: output_hidden_states is a bool, not a list of layers.")
    def test_can_capture_specific_layers_hidden_states(self):
        pass

    def test_forward_signature(self):
        import inspect

        for model_class in self.all_model_classes:
            signature = inspect.signature(model_class.forward)
            self.assertEqual(list(signature.parameters)[1:5], ["pixel_values", "pixel_values_slices", "slice_grid",
                                                               "pixel_mask"])

    def test_model_outputs(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = MROVSegForOpenVocabSegmentation(config).eval()
        with torch.no_grad():
            outputs = model(**inputs)
        self.assertIsInstance(outputs, MROVSegOutput)
        self.assertEqual(outputs.class_queries_logits.shape, (2, config.num_queries, config.num_labels + 1))
        base = MROVSegModel(config).eval()
        with torch.no_grad():
            features = base(**inputs)
        self.assertIsInstance(features, MROVSegModelOutput)
        self.assertEqual(features.query_decoder_hidden_states[-1].shape, (2, config.num_queries, config.hidden_dim))
        self.assertEqual(len(features.fused_features), len(config.feature_layers))


# ---------------------------------------------------------------- image processor
class MROVSegImageProcessingTester(image_common.ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("size", {"shortest_edge": 40, "longest_edge": 120})
        kwargs.setdefault("slice_size", 32)
        kwargs.setdefault("num_labels", 5)
        super().__init__(parent, **kwargs)

    def _get_image_processing_classes(self):
        return {"pil": MROVSegImageProcessor}  # this test file does not live in a transformers model folder

    def expected_output_image_shape(self, images):
        return self.num_channels, self.slice_size, self.slice_size  # pixel_values is the S x S global view

    def prepare_post_process_semantic_segmentation_inputs(self):
        outputs = MROVSegOutput(
            class_queries_logits=torch.randn(self.batch_size, 6, self.num_labels + 1),
            masks_queries_logits=torch.randn(self.batch_size, 6, 24, 32),
        )
        return {"outputs": outputs}, {"num_labels": self.num_labels, "height": 24, "width": 32}


class MROVSegImageProcessingTest(image_common.ImageProcessingTestMixin,
                                 image_common.PostProcessSemanticSegmentationTestMixin, unittest.TestCase):
    image_processor_tester_class = MROVSegImageProcessingTester

    @unittest.skip("CLIP takes exactly 3 channels: every input is converted to RGB (alpha composited onto white), "
                   "as documented and tested in tests/test_image_processing.py.")
    def test_call_numpy_4_channels(self):
        pass

    @unittest.skip("torchvision cannot be installed beside the pinned CPU torch (it breaks transformers' import), so "
                   "this processor is PIL/numpy only by design.")
    def test_new_models_require_torchvision_backend(self):
        pass

    def test_slices_returned(self):
        processor = MROVSegImageProcessor(**self.image_processor_dict)
        inputs = processor(self.image_processor_tester.prepare_image_inputs(), return_tensors="pt")
        self.assertEqual(inputs["pixel_values_slices"].shape[2:], (3, 32, 32))
