"""`with obj:` for objects that hold kernel resources and release them in close()."""

from __future__ import annotations

from typing import Self


class Closing:
    """Mixin: leaving the with-block calls close(), also when the block raises."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
