"""Model cards and publishing (installed as `hf_effattn.model_cards`).

    hf-effattn card model_cards/results/smollm2-gdn --name smollm2-gdn --output smollm2-gdn/README.md
    hf-effattn catalogue                    # every card under model_cards/ and the index, from model_cards/results/
    hf-effattn publish runs/smollm2-gdn --repo-id ORG/smollm2-gdn --dry-run
"""

from .render import CardError, Results, check_card, find_local_paths, load_results, render_card, write_card

__all__ = ["CardError", "Results", "check_card", "find_local_paths", "load_results", "render_card", "write_card"]
