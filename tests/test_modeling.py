import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSemanticSegmentation

from modeling_mrovseg import MROVSegConfig, MROVSegForOpenVocabSegmentation, MROVSegModel, MROVSegOutput
from tests.helpers import LABELS, random_image, tiny_config, tiny_processor
from training.train import enable_activation_checkpointing


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    return MROVSegForOpenVocabSegmentation(tiny_config(**overrides)).eval()


def inputs_for(config, size, labels=False, **processor_kwargs):
    processor = tiny_processor(config, **processor_kwargs)
    image = random_image(*size)
    kwargs = {}
    if labels:
        label = torch.zeros(size, dtype=torch.long)
        label[: size[0] // 2] = 1
        label[size[0] // 2 :, : size[1] // 3] = 2
        label[-3:, -3:] = 255
        kwargs["segmentation_maps"] = [label.numpy(), label.numpy()[::-1].copy()]
    return processor([image, image[::-1].copy()], return_tensors="pt", **kwargs)


@pytest.mark.parametrize("size,overlap", [((96, 96), 0), ((96, 200), 0), ((200, 96), 0), ((150, 260), 16),
                                          ((96, 200), 32), ((40, 40), 0)])
def test_output_shapes(size, overlap):
    model = build(slice_overlap=overlap)
    inputs = inputs_for(model.config, size)
    rows, cols, window, stride = inputs["slice_grid"][0].tolist()
    assert (window, stride) == (64, 64 - overlap)
    height, width = inputs["image_sizes"][0, 2:].tolist()
    assert (height, width) == (64 + (rows - 1) * (64 - overlap), 64 + (cols - 1) * (64 - overlap))
    with torch.inference_mode():
        out = model(**inputs, output_auxiliary_logits=True)
        assert model(**inputs).auxiliary_logits is None  # inference skips the intermediate full-resolution masks
    assert isinstance(out, MROVSegOutput)
    stages = len(model.config.feature_layers)
    assert out.class_queries_logits.shape == (2, 8, len(LABELS) + 1)
    assert out.masks_queries_logits.shape == (2, 8, height // 8 * 2**stages, width // 8 * 2**stages)
    assert len(out.auxiliary_logits) == model.config.num_decoder_layers - 1
    assert out.auxiliary_logits[0]["masks_queries_logits"].shape == out.masks_queries_logits.shape
    assert out.image_sizes[:, 2:].tolist() == [[height, width]] * 2
    assert torch.isfinite(out.masks_queries_logits).all() and torch.isfinite(out.class_queries_logits).all()


def test_single_resolution_path():
    model = build()
    inputs = inputs_for(model.config, (96, 200))
    with torch.inference_mode():
        out = model(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        ablation = build(use_high_res=False)(**inputs)
    assert out.masks_queries_logits.shape == (2, 8, 64, 64)  # the 8 x 8 global token grid, 3 stages of 2x
    assert ablation.masks_queries_logits.shape == (2, 8, 64, 64)


def test_one_slice_equals_the_global_view():
    """On an S x S canvas the only slice *is* the global view: stitched map and global map must agree."""
    model = build()
    inputs = tiny_processor(model.config, size={"height": 64, "width": 64})(random_image(64, 64), return_tensors="pt")
    with torch.inference_mode():
        features = model.mrovseg.encode_multi_resolution(inputs["pixel_values"], inputs["pixel_values_slices"],
                                                         inputs["slice_grid"])
    for layer, tokens in features.global_tokens.items():
        global_map = tokens.transpose(1, 2).reshape(1, -1, 8, 8)
        torch.testing.assert_close(features.high_res_maps[layer], global_map, rtol=1e-5, atol=1e-5)


def test_stitched_tokens_sit_where_their_slice_is():
    model = build()
    inputs = inputs_for(model.config, (96, 200))
    slices, grid = inputs["pixel_values_slices"], inputs["slice_grid"]
    with torch.inference_mode():
        features = model.mrovseg.encode_multi_resolution(inputs["pixel_values"], slices, grid)
        k = 4  # second row, second column of a 2 x 4 grid? check against a direct pass of slice k
        cols = int(grid[0, 1])
        row, col = divmod(k, cols)
        direct = model.mrovseg._run_clip(slices[:, k], [model.config.feature_layers[0]])[model.config.feature_layers[0]]
    stitched = features.high_res_maps[model.config.feature_layers[0]][:, :, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8]
    torch.testing.assert_close(stitched, direct[:, 1:].transpose(1, 2).reshape(2, -1, 8, 8), rtol=1e-5, atol=1e-5)


def test_slice_batch_size_does_not_change_outputs():
    model = build()
    inputs = inputs_for(model.config, (150, 260))
    with torch.inference_mode():
        reference = model(**inputs).masks_queries_logits
        model.config.slice_batch_size = None
        unchunked = model(**inputs).masks_queries_logits
    torch.testing.assert_close(reference, unchunked, rtol=1e-5, atol=1e-5)


def test_training_runs_all_windows_in_one_clip_call():
    """Chunking by slice_batch_size bounds inference memory; in training autograd keeps every chunk anyway, so the
    batch's windows go through CLIP at once (fewer kernel launches), with the values of chunked calls."""
    model = build()  # tiny_config: slice_batch_size=4
    inputs = inputs_for(model.config, (150, 260), labels=True)
    windows = inputs["pixel_values_slices"].shape[:2].numel() + inputs["pixel_values"].shape[0]
    calls = []
    model.mrovseg.vision_model.embeddings.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    with torch.no_grad():
        chunked = model(**inputs).masks_queries_logits
    assert calls == [4] * (windows // 4) + ([windows % 4] if windows % 4 else [])
    calls.clear()
    model.train()
    torch.manual_seed(0)
    trained = model(**inputs)
    assert calls == [windows]
    trained.loss.backward()
    torch.testing.assert_close(trained.masks_queries_logits, chunked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_adapters_get_channels_last_global_maps_at_every_batch_size(batch):
    """The global map reaches each adapter with channels-last strides, as the memory-format rule of ATen's kernels
    reads them (for a batch of one it read as channels-first: CUDA's bilinear upsampling then ran one thread per output
    pixel over all channels, 12% of an eager 640^2 forward on an H200)."""
    from torch._prims_common import suggest_memory_format  # the rule ATen's upsampling and convolutions follow

    model = build()
    seen = []
    for adapter in model.mrovseg.adapters:
        adapter.register_forward_pre_hook(lambda module, args: seen.append(args))
    inputs = inputs_for(model.config, (150, 260))
    with torch.no_grad():
        model(**{k: v[:batch] if k.startswith("pixel_values") else v for k, v in inputs.items()})
    assert len(seen) == len(model.config.feature_layers)
    for global_map, _ in seen:
        assert global_map.shape[0] == batch and suggest_memory_format(global_map) == torch.channels_last


def test_a_loaded_model_keeps_clip_frozen(tmp_path):
    """transformers builds loaded weights as new, trainable parameters: a checkpoint came back with all of CLIP (both
    towers) trainable, and fine-tuning it trained CLIP's open-vocabulary prior away."""
    model = build()
    model.save_pretrained(tmp_path)
    fresh = {n for n, p in model.named_parameters() if p.requires_grad}
    for cls in (MROVSegForOpenVocabSegmentation, AutoModelForSemanticSegmentation):
        loaded = cls.from_pretrained(tmp_path)
        assert {n for n, p in loaded.named_parameters() if p.requires_grad} == fresh
    base = AutoModel.from_pretrained(tmp_path)
    assert {f"mrovseg.{n}" for n, p in base.named_parameters() if p.requires_grad} == {
        n for n in fresh if n.startswith("mrovseg.")}


def test_loss_backward_reaches_every_trainable_parameter():
    model = build().train()
    out = model(**inputs_for(model.config, (96, 200), labels=True))
    assert torch.isfinite(out.loss) and out.loss > 0
    assert set(out.loss_dict) == {"loss_class", "loss_mask", "loss_dice"}
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "mrovseg.vision_model.embeddings.position_embedding.weight" in trainable
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad, no_grad
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("mrovseg.vision_model.encoder.layers") for n in frozen)
    assert all(n.startswith(("mrovseg.vision_model", "text_model", "visual_projection", "text_projection", "logit_scale"))
               for n in frozen)
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_quick_gelu_keeps_only_its_input_with_identical_values_and_gradients(dtype):
    """Training backpropagates through frozen CLIP to its position embeddings; CLIP's QuickGELU (x * sigmoid(1.702 x))
    made autograd keep the MLP's input and its sigmoid. The swapped-in activation keeps the input only and must give
    bit-identical outputs and gradients."""
    from transformers.activations import QuickGELUActivation

    from modeling_mrovseg.layers import MROVSegQuickGELU

    torch.manual_seed(0)
    x = (torch.randn(6, 9, 40) * 4).to(dtype)
    weight = torch.randn(6, 9, 40).to(dtype)
    results = []
    for activation in (QuickGELUActivation(), MROVSegQuickGELU()):
        leaf = x.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().data_ptr()) or t,
                                                      lambda t: t):
            y = activation(leaf)
        (y * weight).sum().backward()
        results.append((y.detach(), leaf.grad, set(saved), leaf.untyped_storage().data_ptr()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert len(results[0][2]) == 2  # the input and the sigmoid
    assert results[1][2] == {results[1][3]}  # the input alone
    with torch.no_grad():  # inference: the plain expression, no autograd function
        assert torch.equal(MROVSegQuickGELU()(x), QuickGELUActivation()(x))


def test_model_uses_the_lean_quick_gelu_in_clip_and_keeps_its_checkpoint_keys():
    from transformers import CLIPVisionModel

    from modeling_mrovseg.layers import MROVSegQuickGELU

    model = build()
    layers = model.mrovseg.vision_model.encoder.layers
    assert all(isinstance(layer.mlp.activation_fn, MROVSegQuickGELU) for layer in layers)
    plain = CLIPVisionModel._from_config(model.config.vision_config)
    assert set(model.mrovseg.vision_model.state_dict()) == set(plain.state_dict())


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = inputs_for(tiny_config(), (96, 200), labels=True)
    grads = []
    for checkpointing in (False, True):
        model = build(seed=1).train()
        if checkpointing:
            enable_activation_checkpointing(model)
            assert model.mrovseg.vision_model.encoder.layers[0].gradient_checkpointing
        torch.manual_seed(0)  # same sampled points
        model(**inputs).loss.backward()
        grads.append(model.mrovseg.vision_model.embeddings.position_embedding.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_label_out_of_vocabulary_is_a_clear_error():
    model = build().train()
    inputs = inputs_for(model.config, (96, 96), labels=True)
    inputs["labels"][0, 0, 0] = 7
    with pytest.raises(ValueError, match="valid ids are 0..2"):
        model(**inputs)


def test_bad_pixel_values_and_grid():
    model = build()
    inputs = inputs_for(model.config, (96, 200))
    with pytest.raises(ValueError, match="global view"):
        model(pixel_values=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="does not match"):
        model(pixel_values=inputs["pixel_values"], pixel_values_slices=inputs["pixel_values_slices"],
              slice_grid=torch.tensor([[1, 1, 64, 64], [1, 1, 64, 64]]), image_sizes=inputs["image_sizes"])
    with pytest.raises(ValueError, match="rows, cols, slice size, stride"):
        model(pixel_values=inputs["pixel_values"], pixel_values_slices=inputs["pixel_values_slices"],
              slice_grid=inputs["slice_grid"][:, :2], image_sizes=inputs["image_sizes"])
    with pytest.raises(ValueError, match="slice_grid"):
        model(pixel_values=inputs["pixel_values"], pixel_values_slices=inputs["pixel_values_slices"])


def test_misspelt_forward_arguments_are_refused_and_transformers_own_pass():
    """`pixel_value_slices=` (one letter short) vanished into **kwargs and the single-resolution ablation ran."""
    model = build().eval()
    inputs = inputs_for(model.config, (96, 200))
    typo = {"pixel_value_slices" if k == "pixel_values_slices" else k: v for k, v in inputs.items()}
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) pixel_value_slices \(did you mean "
                                        r"pixel_values_slices\?\)"):
        model(**typo)
    with pytest.raises(TypeError, match="MROVSegModel.forward got unexpected argument"):
        model.mrovseg(**typo)
    with torch.inference_mode():  # what transformers itself passes (Trainer, common tests) still runs
        expected = model(**inputs).masks_queries_logits
        passed = model(**inputs, num_items_in_batch=4, output_attentions=True).masks_queries_logits
    assert torch.equal(passed, expected)


def test_slices_without_image_sizes_are_an_error_not_stretched_padding(checkpoint):
    """Processor outputs passed by hand without image_sizes: the outputs then held no image_sizes, and
    post-processing took the padded canvas for the image (the main job's model: 76% of the pixels agreed)."""
    from transformers import AutoImageProcessor

    model = MROVSegForOpenVocabSegmentation.from_pretrained(checkpoint).eval()
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    inputs = processor(random_image(90, 150), return_tensors="pt")
    assert inputs["image_sizes"][0, 1] < inputs["image_sizes"][0, 3]  # the canvas is padded
    by_hand = {k: inputs[k] for k in ("pixel_values", "pixel_values_slices", "slice_grid")}
    with pytest.raises(ValueError, match="pixel_values_slices need image_sizes"):
        model(**by_hand)
    with torch.inference_mode():
        expected = processor.post_process_semantic_segmentation(model(**inputs), target_sizes=[(90, 150)])[0]
        mask = processor(random_image(90, 150), return_pixel_mask=True, return_tensors="pt")["pixel_mask"]
        from_mask = model(**by_hand, pixel_mask=mask)  # pixel_mask says the same
    assert torch.equal(processor.post_process_semantic_segmentation(from_mask, target_sizes=[(90, 150)])[0], expected)


def test_processor_with_another_slice_overlap_is_an_error_not_a_stretched_mask():
    model = build()  # slice_overlap 0
    inputs = tiny_processor(model.config, slice_overlap=16, size={"height": 96, "width": 224})(
        random_image(96, 224), return_tensors="pt")
    with pytest.raises(ValueError, match=r"stride 48 \(overlap 16\).*stride 64 \(slice_overlap=0\)"):
        model(**inputs)
    from modeling_mrovseg import MROVSegImageProcessor

    matching = MROVSegImageProcessor.from_model_config(model.config, size={"height": 96, "width": 224})
    with torch.inference_mode():
        out = model(**matching(random_image(96, 224), return_tensors="pt"))
    assert out.masks_queries_logits.shape[-2:] == (128, 256)  # the 128 x 256 canvas's token grid x 8


def test_tuple_output():
    model = build()
    inputs = inputs_for(model.config, (96, 96))
    with torch.inference_mode():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
    assert torch.equal(as_tuple[0], as_dict.class_queries_logits) and torch.equal(as_tuple[1], as_dict.masks_queries_logits)


def test_save_and_load_gives_identical_outputs(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    assert {"modeling_mrovseg.py", "configuration_mrovseg.py", "masked_attention.py"} <= files  # remote code
    inputs = inputs_for(model.config, (96, 200))
    with torch.inference_mode():
        expected = model(**inputs)
        # the base model, like Mask2FormerModel; the head's weights are left out by design, not reported UNEXPECTED
        base, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
        assert isinstance(base.eval(), MROVSegModel) and not info["unexpected_keys"] and not info["missing_keys"]
        torch.testing.assert_close(base(**inputs).pixel_decoder_last_hidden_state,
                                   model.mrovseg(**inputs).pixel_decoder_last_hidden_state, rtol=0, atol=0)
        for cls in (MROVSegForOpenVocabSegmentation, AutoModelForSemanticSegmentation):
            loaded = cls.from_pretrained(tmp_path).eval()
            assert isinstance(loaded, MROVSegForOpenVocabSegmentation)
            got = loaded(**inputs)
            assert torch.equal(got.class_queries_logits, expected.class_queries_logits)
            assert torch.equal(got.masks_queries_logits, expected.masks_queries_logits)
            assert torch.equal(loaded.vocabulary_embeds, model.vocabulary_embeds)
    # the head ignores none of its own keys: a stray one is still reported
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    save_file({**weights, "classifier.stray": torch.zeros(1)}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, info = MROVSegForOpenVocabSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["unexpected_keys"]) == {"classifier.stray"}


# ---------------------------------------------------------------- text side and CLIP weights
def test_from_clip_copies_weights_exactly(tiny_clip_dir):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    model = MROVSegForOpenVocabSegmentation.from_clip(str(tiny_clip_dir), vocabulary=LABELS, num_queries=8,
                                                      hidden_dim=32, num_decoder_heads=4)
    for name in ("vision_model", "visual_projection", "text_model", "text_projection"):
        ours = (model.mrovseg.vision_model if name == "vision_model" else getattr(model, name)).state_dict()
        theirs = getattr(clip, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert torch.equal(model.logit_scale, clip.logit_scale)
    assert model.config.id2label == dict(enumerate(LABELS))
    assert model.vocabulary_embeds.shape == (3, clip.config.projection_dim)


def test_from_clip_refuses_a_clip_without_its_text_tower(tiny_clip_dir, checkpoint, tmp_path):
    """A vision-only CLIP checkpoint loaded as CLIPModel got a random text tower (transformers only logs the missing
    weights): every class name embedded to noise, silently. Another model (a SigLIP, a trained MROVSeg) printed a
    long load report and failed with "ignore_mismatched_sizes"; each is named."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import CLIPModel, CLIPVisionModel, SiglipConfig, SiglipModel

    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    CLIPVisionModel(clip.config.vision_config).save_pretrained(tmp_path / "vision")
    clip.save_pretrained(tmp_path / "stripped")
    weights = tmp_path / "stripped" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("text_model.")}, weights,
              metadata={"format": "pt"})
    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    SiglipModel(SiglipConfig(text_config={**tiny, "vocab_size": 99}, vision_config={
        **tiny, "image_size": 32, "patch_size": 8})).save_pretrained(tmp_path / "siglip")
    for folder in ("vision", "stripped", "siglip"):
        for tokenizer_file in tiny_clip_dir.glob("*tok*"):  # a tokenizer is there: the weights are what is wrong
            shutil.copy(tokenizer_file, tmp_path / folder)
    for folder, message in (
            (tmp_path / "stripped", r"does not hold a whole CLIP \(CLIPModel\): \d+ of its weights are missing"),
            (tmp_path / "vision", r"is a 'clip_vision_model' checkpoint, not a CLIP: from_clip takes a CLIPModel"),
            (tmp_path / "siglip", r"is a 'siglip' checkpoint, not a CLIP: from_clip takes a CLIPModel"),
            (checkpoint, r"is an MROVSeg checkpoint: load it with from_pretrained")):
        with pytest.raises(ValueError, match=message):
            MROVSegForOpenVocabSegmentation.from_clip(str(folder), vocabulary=LABELS)


def test_from_clip_names_a_keyword_it_does_not_take(tmp_path):
    """`from_clip(..., class_names=[...])` (the training scripts' name) said "MROVSegConfig has no field(s)
    class_names", as if the config were at fault; it is refused before CLIP loads (the folder here holds none)."""
    for keyword, meant in (("class_names", "vocabulary"), ("labels", "vocabulary"), ("num_querys", "num_queries")):
        with pytest.raises(TypeError, match=rf"from_clip\(\) got unknown keyword\(s\) {keyword} "
                                            rf"\(did you mean {meant}\?\)"
                                            r"; it takes vocabulary \(the class names\), tokenizer and MROVSegConfig"):
            MROVSegForOpenVocabSegmentation.from_clip(str(tmp_path), **{keyword: ["a"]})


def test_set_vocabulary_prompt_ensemble_and_synonyms(tiny_clip_dir, tiny_tokenizer):
    model = MROVSegForOpenVocabSegmentation.from_clip(str(tiny_clip_dir), num_queries=8, hidden_dim=32,
                                                      num_decoder_heads=4, prompt_templates=["a photo of a {}.", "a {}"])
    model.set_vocabulary(["sofa, couch", "lamp"], tiny_tokenizer)
    assert model.config.id2label == {0: "sofa, couch", 1: "lamp"} and model.config.label2id["lamp"] == 1

    def embed(prompts):
        tokens = tiny_tokenizer(prompts, padding=True, return_tensors="pt")
        return model.encode_text(tokens["input_ids"], tokens["attention_mask"])

    sofa = F.normalize(embed(["a photo of a sofa.", "a sofa"]).mean(0), dim=-1)
    couch = F.normalize(embed(["a photo of a couch.", "a couch"]).mean(0), dim=-1)
    torch.testing.assert_close(model.vocabulary_embeds[0], F.normalize(sofa + couch, dim=-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Duplicate"):
        model.set_vocabulary(["lamp", "Lamp"], tiny_tokenizer)
    with pytest.raises(ValueError, match="empty"):
        model.set_vocabulary([], tiny_tokenizer)


def test_class_names_given_to_from_pretrained_are_embedded_not_renamed(checkpoint, tiny_tokenizer, tmp_path):
    """`from_pretrained(ckpt, id2label=...)` renamed the saved embeddings (pixels of "sky" labelled "a"); the names
    are now embedded with the checkpoint's tokenizer, as set_vocabulary does, also through AutoModel* (a config with
    other labels) and for another number of classes (a size-mismatch error before)."""
    import shutil

    names = ["cat", "dog", "sofa, couch", "lamp"]
    expected = MROVSegForOpenVocabSegmentation.from_pretrained(checkpoint)
    saved = expected.vocabulary_embeds.clone()
    expected.set_vocabulary(names, tiny_tokenizer)
    for model in (MROVSegForOpenVocabSegmentation.from_pretrained(checkpoint, id2label=dict(enumerate(names)),
                                                                  label2id={n: i for i, n in enumerate(names)}),
                  AutoModelForSemanticSegmentation.from_pretrained(checkpoint, id2label=dict(enumerate(names)),
                                                                   label2id={n: i for i, n in enumerate(names)})):
        assert model.vocabulary == names and torch.equal(model.vocabulary_embeds, expected.vocabulary_embeds)
    same = MROVSegForOpenVocabSegmentation.from_pretrained(checkpoint, id2label=dict(enumerate(LABELS)))
    assert torch.equal(same.vocabulary_embeds, saved)  # the saved names: the saved embeddings, nothing re-embedded
    with pytest.raises(ValueError, match="num_labels= cannot name classes"):
        MROVSegForOpenVocabSegmentation.from_pretrained(checkpoint, num_labels=5)
    with pytest.raises(ValueError, match="label2id= cannot name classes"):  # it was dropped: the saved names stayed
        MROVSegForOpenVocabSegmentation.from_pretrained(checkpoint, label2id={"cat": 0})
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(checkpoint, bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab.json", "merges.txt",
                                                                    "special_tokens_map.json", "processor_config.json"))
    with pytest.raises(ValueError, match="need the CLIP tokenizer"):
        MROVSegForOpenVocabSegmentation.from_pretrained(bare, id2label=dict(enumerate(names)))

def test_per_call_vocabulary(tiny_clip_dir, tiny_tokenizer):
    model = MROVSegForOpenVocabSegmentation.from_clip(str(tiny_clip_dir), vocabulary=LABELS, num_queries=8,
                                                      hidden_dim=32, num_decoder_heads=4).eval()
    inputs = inputs_for(model.config, (96, 96))
    with torch.inference_mode():
        stored = model(**inputs).class_queries_logits
        explicit = model(**inputs, text_embeds=model.vocabulary_embeds).class_queries_logits
        tokens = tiny_tokenizer(["a photo of a cat.", "a photo of a dog."], padding=True, return_tensors="pt")
        two = model(**inputs, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    torch.testing.assert_close(stored, explicit)
    assert two.class_queries_logits.shape == (2, 8, 3)


def test_vit_b16_shapes_and_parameter_counts():
    config = MROVSegConfig.from_preset("vit-b-16", id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    model = MROVSegForOpenVocabSegmentation(config).eval()
    summary = model.parameter_summary()
    C, L, I, P, T = 768, 12, 3072, 512, 512  # noqa: N806
    layer = lambda c, i: 4 * (c * c + c) + 4 * c + (c * i + i) + (i * c + c)  # noqa: E731
    vision = C + 3 * 16 * 16 * C + 197 * C + 2 * C + L * layer(C, I) + 2 * C
    text = 49408 * T + 77 * T + L * layer(T, 4 * T) + 2 * T
    assert summary["clip_vision"]["total"] == vision + C * P == 85_799_424 + 393_216
    assert summary["clip_text"]["total"] == text + T * P
    assert summary["clip_text"]["trainable"] == 0
    assert summary["clip_vision"]["trainable"] == 197 * C  # only the position embeddings
    D, k = 256, 3  # noqa: N806
    adapter = (C * k * k + C) + (C * C + C) + (2 * C * 2 + 2) + (C * D + D) + 2 * D
    assert sum(p.numel() for p in model.mrovseg.adapters.parameters()) == 3 * adapter
    heads, bias_dim, remaining = 12, 32, 3  # SAN-style bias decoder: one (query, pixel) embedding per layer and head
    bias_decoder = (D * D + D) + (D * remaining * heads * bias_dim + remaining * heads * bias_dim) \
        + (D * remaining * heads * bias_dim + remaining * heads * bias_dim) + 2 * remaining * heads
    assert sum(p.numel() for p in model.masked_attention.parameters()) == C * C + C + 100 * C + bias_decoder
    assert summary["mrovseg_modules"]["total"] == summary["mrovseg_modules"]["trainable"] > 3 * adapter

    from modeling_mrovseg import MROVSegImageProcessor

    inputs = MROVSegImageProcessor()(random_image(640, 640), return_tensors="pt")
    assert inputs["pixel_values_slices"].shape == (1, 9, 3, 224, 224)
    with torch.inference_mode():
        out = model(**inputs)
    assert out.masks_queries_logits.shape == (1, 100, 42 * 8, 42 * 8)
    assert out.class_queries_logits.shape == (1, 100, 3)


def test_class_names_one_spelling_and_distinct_within_clip_context(tiny_clip_dir, tiny_tokenizer):
    from modeling_mrovseg.text_classifier import validate_labels

    assert validate_labels(["traffic  cone", "cafe\u0301"]) == ["traffic cone", "caf\u00e9"]
    with pytest.raises(ValueError, match="Duplicate class name"):
        validate_labels(["traffic cone", "traffic  cone"])
    # pasted from a web page or a terminal: a zero-width space, a BOM, a control character (one class, no box in
    # the legend); a zero-width non-joiner, which spells Persian words, is kept
    assert validate_labels(["sky\u200b", "\ufeffroad", "traffic\x00cone", "خانه\u200cها"]) == [
        "sky", "road", "traffic cone", "خانه\u200cها"]
    with pytest.raises(ValueError, match="Duplicate class name 'sky'"):
        validate_labels(["sky", "sky\u200b"])
    # a synonym of two classes splits what it describes between them: said, naming both
    with pytest.warns(UserWarning, match=r"'road' names class 0 \('road'\) and class 1 \('Road, street'\)"):
        assert validate_labels(["road", "Road, street"]) == ["road", "Road, street"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_labels(["sofa, couch, sofa", "lamp"])  # a synonym repeated within its own class is no conflict
        from processing import class_names

        for vocabulary in (class_names.ADE20K_150, class_names.COCO_STUFF_171, class_names.PASCAL_CONTEXT_59):
            validate_labels(vocabulary)
    model = MROVSegForOpenVocabSegmentation.from_clip(str(tiny_clip_dir), num_queries=8, hidden_dim=32,
                                                      num_decoder_heads=4, prompt_templates=["{}"])
    long = "x" * 90  # the tiny tokenizer has no merges: one token per character
    with pytest.raises(ValueError, match="identical within CLIP's 77-token context"), pytest.warns(UserWarning):
        model.set_vocabulary([long + " red", long + " blue"], tiny_tokenizer)
    model.set_vocabulary(["red " + long, "blue " + long], tiny_tokenizer)  # they differ early: fine


def test_compiled_forward_has_no_graph_break_and_matches_eager():
    """torch.compile over the whole inference forward: one graph (no host sync), same outputs, geometry still checked.
    aot_eager traces exactly what inductor would be given, without its minutes of C++ compilation on this CPU."""
    model = build()
    inputs = inputs_for(model.config, (96, 200), return_pixel_mask=True)  # its shape is the canvas: no host read
    explanation = torch._dynamo.explain(model)(**inputs)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        eager, fast = model(**inputs), compiled(**inputs)
        torch.testing.assert_close(fast.class_queries_logits, eager.class_queries_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.masks_queries_logits, eager.masks_queries_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(fast.image_sizes, eager.image_sizes)
        assert eager.image_sizes.tolist() == inputs_for(model.config, (96, 200))["image_sizes"].tolist()
        wrong = {**inputs, "slice_grid": inputs["slice_grid"] * torch.tensor([1, 1, 1, 0])}  # stride 0
        with pytest.raises(RuntimeError, match="slice geometry"):
            compiled(**wrong)
    with pytest.raises(ValueError, match="2 slices were given"):  # eager: the canvas of pixel_mask fixes the grid
        model(**{**inputs, "pixel_values_slices": inputs["pixel_values_slices"][:, :2],
                 "slice_grid": torch.tensor([[1, 2, 64, 64]] * 2)})
    torch._dynamo.reset()


def test_labels_must_cover_the_canvas():
    model = build()
    inputs = inputs_for(model.config, (96, 200))
    height, width = inputs["image_sizes"][0, 2:].tolist()
    with pytest.raises(ValueError, match="canvas of image_sizes"):
        model(**inputs, labels=torch.zeros(2, height, width - 1, dtype=torch.long))
    with pytest.raises(ValueError, match="differ in size"):
        model(**inputs_for(model.config, (96, 200), return_pixel_mask=True),
              labels=torch.zeros(2, height - 1, width, dtype=torch.long))


@pytest.mark.parametrize("compiled", ["whole", "regions", "accelerate_regions"])
def test_compiled_training_step_equals_eager(compiled):
    """`training.train --compile`: the forward with labels through torch.compile (the loss's matching breaks the
    graph for scipy on the host) gives the eager loss and gradients. So does `--compile regional`
    (`compile_regions`: CLIP's layers, adapters, decoders compiled in place, one build per block shape), and
    accelerate's regional compilation (`accelerate config`), which compiled the pixel decoder's mixed list of
    laterals as one module that then could not be iterated."""
    from accelerate.utils import compile_regions

    model = build().train()
    inputs = inputs_for(model.config, (96, 200), labels=True, return_pixel_mask=True)
    seeds = torch.tensor([3, 4])
    grads = []

    def compiled_model():  # after the eager step: `compile_regions` compiles the model itself
        if compiled == "regions":
            model.compile_regions(backend="aot_eager")
            assert model.mrovseg.vision_model.encoder.layers[0]._compiled_call_impl is not None
            return model
        return (compile_regions if compiled == "accelerate_regions" else torch.compile)(model, backend="aot_eager")

    for step in ("eager", "compiled"):
        forward = model if step == "eager" else compiled_model()
        model.zero_grad()
        loss = forward(**inputs, loss_seeds=seeds).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    assert len(grads[1][1]) == len(grads[0][1]) > 10
    for with_compile, eager in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(with_compile, eager, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("self_attention", [True, False])
def test_query_decoder_attention_equals_nn_multihead_attention(self_attention):
    from modeling_mrovseg.mask_decoder import attend

    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    query = torch.randn(2, 7, 32)
    key = query if self_attention else torch.randn(2, 11, 32)
    value = torch.randn(2, 7, 32) if self_attention else torch.randn(2, 11, 32)
    expected = attn(query, key, value, need_weights=False)[0]
    torch.testing.assert_close(attend(attn, query, key, value), expected, rtol=1e-5, atol=1e-6)


def test_attention_biases_are_the_documented_per_layer_dot_products():
    """Query embeddings are computed once for all layers; each layer's bias is still its own group's scaled dot
    product of query and pixel embeddings plus its shift."""
    model = build()
    decoder = model.masked_attention.bias_decoder
    with torch.no_grad():
        decoder.scale.uniform_(0.5, 2.0)
        decoder.shift.normal_()
    queries, memory = torch.randn(2, 8, 32), torch.randn(2, 32, 5, 6)
    heads, dim = decoder.num_heads, decoder.embed_dim
    embeds = decoder.embed_queries(queries)
    for layer in range(decoder.num_layers):
        columns = slice(layer * heads * dim, (layer + 1) * heads * dim)
        q = decoder.query_embed(queries)[..., columns].view(2, 8, heads, dim)
        p = F.conv2d(memory, decoder.pixel_embed.weight[columns], decoder.pixel_embed.bias[columns]).view(2, heads, dim, 30)
        groups = slice(layer * heads, (layer + 1) * heads)
        expected = torch.einsum("bqgd,bgdp->bgqp", q, p) * dim**-0.5 * decoder.scale[groups, None, None]
        expected = (expected + decoder.shift[groups, None, None]).view(2, heads, 8, 5, 6)
        torch.testing.assert_close(decoder(embeds, memory, layer), expected, rtol=1e-5, atol=1e-5)


def test_a_forward_without_slices_says_it_runs_the_ablation():
    """pixel_values alone (CLIP's processor's output, say) ran the single-resolution ablation without a word; it says
    so once, and the ablation switch itself (use_high_res=False) runs quietly."""
    from transformers.testing_utils import CaptureLogger

    from modeling_mrovseg import modeling_mrovseg

    inputs = inputs_for(tiny_config(), (64, 96))
    for use_high_res, expected in ((True, True), (False, False)):
        model = build(use_high_res=use_high_res)
        modeling_mrovseg.logger.warning_once.cache_clear()
        with CaptureLogger(modeling_mrovseg.logger) as captured, torch.inference_mode():
            model(pixel_values=inputs["pixel_values"])
            model(**inputs)
        assert ("runs its single-resolution ablation" in captured.out) == expected
        assert captured.out.count("single-resolution") <= 1
