// grid.wgsl: what every entry point is told about its invocation, and the undoing of the
// 2-D grid fold (dispatches longer than max_compute_workgroups_per_dimension are folded
// into 2-D grids by src/plan `fold_grid`).

struct Invocation {
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
}

// The workgroup's index in the unfolded, linear dispatch.
fn workgroup_index(inv: Invocation) -> u32 {
    return inv.wid.y * inv.nwg.x + inv.wid.x;
}
