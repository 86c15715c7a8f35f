"""Position embeddings: learned pixel-grid tables resampled like timm's, and 2-D sin-cos.

Coordinate convention (one place): a token's position is (x, y) = (column, row)
on its token grid, in grid units (patches for the pixel encoder, tiles for the
slide encoder), ``positions[..., 0]`` = x and ``positions[..., 1]`` = y. This is
the order of the level-0 (x, y) ``coords`` in tile HDF5 files; divide those by
the tile size in level-0 pixels to get grid units.

The learned table of the pixel encoder covers the grid of its default image
size (LongViT: 32 x 32 for 1024 px at 32 px patches). For another grid it is
resampled exactly as ``timm.layers.resample_abs_pos_embed`` does (bicubic,
align_corners=False, antialiased; or, with antialias=False, plain bicubic as
torchscale's LongViT fine-tuning resamples its table). ``sample_pos_embed`` returns
that resampled table at chosen grid positions without building the whole resampled
grid: a 100k x 80k pixel slide at 32 px patches has a 3125 x 2500 grid, 7.8M rows of
which only the tissue positions are needed.
"""

from __future__ import annotations

import functools

import torch
from timm.layers import resample_abs_pos_embed

from longvit.interpolation import interpolation_matrix


def resample_pos_embed(
    pos_embed: torch.Tensor,
    old_size: tuple[int, int],
    new_size: tuple[int, int],
    antialias: bool = True,
) -> torch.Tensor:
    """A learned (1, H0 * W0, C) grid table resampled to (1, H * W, C), timm's way:
    bicubic, align_corners=False, computed in float32; antialias as given."""
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(new_size),
        old_size=list(old_size),
        num_prefix_tokens=0,
        antialias=antialias,
    )


@functools.lru_cache(maxsize=64)
def _interp_taps(old: int, new: int, antialias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1-D resize old -> new of resample_abs_pos_embed as sparse taps.

    Returns (index (new, K) int64, weight (new, K) float32): output row i is
    sum_k weight[i, k] * input[index[i, k]]. Obtained by resizing the identity with
    the same F.interpolate call, so it is that call's operator, whatever kernel it uses.
    """
    matrix = interpolation_matrix(old, new, "bicubic", torch.float32, antialias)  # (new, old)
    nonzero = matrix != 0
    k = max(1, int(nonzero.sum(1).max()))
    # put each row's nonzero columns first; padding taps get weight 0
    order = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, :k]
    return order, torch.gather(matrix, 1, order)


def sample_pos_embed(
    pos_embed: torch.Tensor,
    old_size: tuple[int, int],
    grid_size: tuple[int, int],
    positions: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    chunk_size: int = 2**20,
    antialias: bool = True,
) -> torch.Tensor:
    """Rows of ``resample_pos_embed(pos_embed, old_size, grid_size, antialias)`` at grid
    positions.

    Args:
        pos_embed: (1, H0 * W0, C) learned table on an H0 x W0 grid.
        old_size: (H0, W0).
        grid_size: (H, W) rows and columns of the grid the table is stretched over.
        positions: (N, 2) integer (x, y) grid positions, 0 <= x < W, 0 <= y < H.
        out_dtype: dtype of the result (default pos_embed's); the float32 work is
            done chunk_size positions at a time and cast per chunk.

    Returns:
        (N, C) in out_dtype. The resize is separable: the table is first
        resized along x at all W columns (H0 x W x C, small), then each token takes
        a few taps along y. Memory O(H0 * W * C + N * C), never O(H * W * C).
    """
    h0, w0 = old_size
    h, w = int(grid_size[0]), int(grid_size[1])
    c = pos_embed.shape[-1]
    table = pos_embed.reshape(h0, w0, c).float()
    ix, wx = (t.to(pos_embed.device) for t in _interp_taps(w0, w, antialias))
    iy, wy = (t.to(pos_embed.device) for t in _interp_taps(h0, h, antialias))
    # along x: cols[a, x] = sum_k wx[x, k] * table[a, ix[x, k]]
    cols = (table[:, ix] * wx[None, :, :, None]).sum(2)  # (H0, W, C)
    cols = cols.reshape(h0 * w, c)
    out_dtype = pos_embed.dtype if out_dtype is None else out_dtype
    parts = []
    for start in range(0, positions.shape[0], chunk_size):
        x = positions[start : start + chunk_size, 0].long()
        y = positions[start : start + chunk_size, 1].long()
        out = None
        for k in range(iy.shape[1]):  # along y: a few taps per row
            term = cols.index_select(0, iy[y, k] * w + x) * wy[y, k, None]
            out = term if out is None else out + term
        parts.append(out.to(out_dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def sincos_2d(
    coords: torch.Tensor,
    dim: int,
    temperature: float = 10000.0,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding of (x, y) coordinates, computed on the fly.

    Args:
        coords: (..., 2) grid positions (x, y), any real values.
        dim: output channels, a multiple of 4 (a quarter each: sin x, cos x, sin y, cos y).
        temperature: the base of the geometric frequency ladder (MAE, Prov-GigaPath).
        compute_dtype: dtype of the products and sines (float64: the values of a table
            computed in float64 and stored in float32, as MAE's NumPy code makes it).

    Returns:
        (..., dim) float32, laid out as MAE's get_2d_sincos_pos_embed (first half x,
        second half y) but without its (grid rows * cols, dim) buffer.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float64, device=coords.device) / quarter
    omega = (1.0 / temperature**omega).to(compute_dtype)  # (dim / 4,)
    c = coords.to(compute_dtype)
    out_x = c[..., 0:1] * omega  # (..., dim / 4)
    out_y = c[..., 1:2] * omega
    out = torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=-1)
    return out.to(torch.float32)


GIGAPATH_GRID_SIZE = 1000  # Prov-GigaPath's table covers 1000 x 1000 tiles


def gigapath_pos_embed(tile_grid: torch.Tensor, dim: int) -> torch.Tensor:
    """Prov-GigaPath's fixed position embedding of tiles at integer grid indices.

    Their slide encoder keeps a (1 + 1000 * 1000, dim) table, MAE's
    ``get_2d_sincos_pos_embed(dim, 1000, cls_token=True)`` computed in float64 by NumPy
    and stored in float32, and gives the tile at grid (x, y) = floor(coords / 256) the row
    ``x * 1000 + y + 1``. MAE's meshgrid makes table row ``i * 1000 + j`` (+ 1) encode j
    in the first half of the channels and i in the second, and their index makes i = x,
    j = y: the first half is the 1-D sin-cos of y, the second that of x, i.e.
    ``sincos_2d`` of (y, x) computed in float64. This computes those rows per tile
    (equal to all 1,000,000 of the table's, bit for bit) instead of holding the 3 GB table.

    Args:
        tile_grid: (..., 2) integer (x, y) = (column, row) grid indices, each in
            [0, 1000) (``longvit.models.tile_positions`` checks that).
        dim: channels, a multiple of 4.

    Returns:
        (..., dim) float32, equal to their table's rows.
    """
    return sincos_2d(tile_grid.flip(-1), dim, compute_dtype=torch.float64)


def grid_positions(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """(height * width, 2) int64 (x, y) positions of a grid in row-major order."""
    y, x = torch.meshgrid(
        torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
    )
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)
