"""Public zero-shot classification API: ``from cultureclip import zeroshot``.

Example::

    from cultureclip import CultureCLIP, zeroshot

    model = CultureCLIP.from_pretrained("ViT-B-32-quickgelu", pretrained="openai")
    classes = zeroshot.load_classnames("classes.txt")
    result = zeroshot.classify(model, "photos/", classes)  # or "labels.csv" with path,label
    print(result.metrics)  # acc1, acc5, mean_per_class_recall when the images have labels
    zeroshot.write_predictions(result, "predictions.csv")

The implementation lives in :mod:`cultureclip.eval.zeroshot` and :mod:`cultureclip.eval.imagesets`;
images are decoded by :mod:`cultureclip.images` (pixel cap ``max_pixels``, 8-bit RGB, ``ImageDecodeError``).
"""
from cultureclip.eval.imagesets import ImageSet, open_images, register_image_source
from cultureclip.images import ImageDecodeError
from cultureclip.eval.zeroshot import (DEFAULT_TEMPLATES, IMAGENET_CLASSNAMES_FILE, OPENAI_TEMPLATES_FILE,
                                       ClassificationResult, classification_metrics, classify, confusion_matrix,
                                       load_classnames, load_templates, write_confusion, write_predictions)

__all__ = ["DEFAULT_TEMPLATES", "IMAGENET_CLASSNAMES_FILE", "OPENAI_TEMPLATES_FILE", "ClassificationResult",
           "ImageDecodeError", "ImageSet", "classification_metrics", "classify", "confusion_matrix",
           "load_classnames", "load_templates", "open_images", "register_image_source", "write_confusion",
           "write_predictions"]
