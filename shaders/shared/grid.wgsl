// grid.wgsl: dispatches longer than max_compute_workgroups_per_dimension are folded into
// 2-D grids (src/plan `fold_grid`); this undoes the fold.

fn linear_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}
