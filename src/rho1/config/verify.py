"""`rho1 verify`: the full check of a TokenStore or ScoreStore (every file hashed, every token id checked)."""

from __future__ import annotations

from dataclasses import dataclass

from rho1.config.options import opt


@dataclass
class VerifyConfig:
    stores: list[str] = opt(factory=list, help="TokenStore or ScoreStore folders to check in full", positional=True)

    def check(self) -> None:
        if not self.stores:
            raise ValueError("rho1 verify needs a STORE folder (a TokenStore of `rho1 prepare` or a ScoreStore of "
                             "`rho1 score`)")
