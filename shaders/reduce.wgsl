// Sum of per-thread tiles of up to TILE partial sums over the workgroup. With
// subgroups, each subgroup adds its lanes first and only the subgroup totals meet in
// workgroup memory; without, a tree over workgroup memory. Returns total `lid` (valid
// for lid < nt). Must be called in uniform control flow.

const TILE: u32 = 32u;
var<workgroup> red: array<f32, 2048>; // TILE * WG

#if SUBGROUP
fn reduce_tile(acc: ptr<function, array<f32, 32>>, lid: u32, nt: u32, sg_lane: u32) -> f32 {
    for (var t = 0u; t < nt; t++) {
        let s = subgroupAdd((*acc)[t]);
        // One writer per subgroup; the others leave a zero, so no assumption is made
        // about how invocations are laid out in subgroups.
        red[t * WG + lid] = select(0.0, s, sg_lane == 0u);
    }
    workgroupBarrier();
    var total = 0.0;
    if (lid < nt) {
        for (var i = 0u; i < WG; i++) {
            total += red[lid * WG + i];
        }
    }
    return total;
}
#else
fn reduce_tile(acc: ptr<function, array<f32, 32>>, lid: u32, nt: u32) -> f32 {
    for (var t = 0u; t < nt; t++) {
        red[t * WG + lid] = (*acc)[t];
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            for (var t = 0u; t < nt; t++) {
                red[t * WG + lid] += red[t * WG + lid + s];
            }
        }
        workgroupBarrier();
    }
    var total = 0.0;
    if (lid < nt) {
        total = red[lid * WG];
    }
    return total;
}
#endif
