"""The SASS reading behind the GPU reports (malloc_kernels/triton/sass.py): main-loop detection, instruction
categories, occupancy and the two time floors, on hand-written disassembly."""
from malloc_kernels.triton import sass

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
.L_x_0:
        /*0020*/                   LDS.U16 R6, [R3] ;
        /*0030*/                   FFMA R7, R6, R6, R7 ;
        /*0040*/                   FFMA R8, R6, R6, R8 ;
        /*0050*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0060*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0070*/                   LDSM.16.M88.4 R12, [R9] ;
        /*0080*/                   HMMA.16816.F32 R16, R12, R8, R16 ;
        /*0090*/                   HMMA.16816.F32 R20, R12, R10, R20 ;
        /*00a0*/                   MUFU.EX2 R5, R5 ;
        /*00b0*/                   STS [R9], R5 ;
        /*00c0*/              @!P1 BRA `(.L_x_1) ;
        /*00d0*/                   EXIT ;
"""


def test_main_loop_is_the_tensor_core_loop():
    mix = sass.main_loop_mix(SASS)
    assert mix.loops == 2 and mix.total == 7
    assert mix.counts == dict(mma=2, fp32=0, lds=1, sts=1, ldg=1, mufu=1)
    assert mix.per_key(2)["mma"] == 1.0


def test_hottest_loop_of_a_scalar_kernel():
    scalar = SASS.replace("HMMA.16816.F32", "IADD3")
    mix = sass.hottest_loop_mix(scalar)
    assert mix.counts["fp32"] == 2 and mix.counts["lds"] == 1 and mix.total == 4


def test_no_loop():
    assert sass.main_loop_mix("        /*0000*/                   EXIT ;") is None


def test_occupancy_rules():
    # 128 regs x 256 threads = 32K registers: 2 blocks; shared memory 100 KB: 1 block on A100, 2 on H100
    assert sass.occupancy(80, 128, 256, 0) == 2
    assert sass.occupancy(80, 64, 256, 100 * 1024) == 1
    assert sass.occupancy(90, 64, 256, 100 * 1024) == 2
    assert sass.occupancy(80, 255, 1024, 0) == 0  # 255 x 1024 registers do not fit
    assert sass.occupancy(90, 32, 64, 0) == 32    # the 32-block limit


def test_bounds():
    mem, issue = sass.bounds(90, 3.35e12, 132 * 4 * 1.98e9, 1, 1)
    assert abs(mem - 1.0) < 1e-9 and abs(issue - 1.0) < 1e-9


def test_cuobjdump_absolute_branch_targets():
    text = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a0000017a02 */
        /*0010*/                   LDS R6, [R3] ;                         /* 0x0000000003067984 */
        /*0020*/                   FFMA R7, R6, R6, R7 ;                  /* 0x0000000606077223 */
        /*0030*/               @P0 BRA 0x10 ;                             /* 0xffffffd000000947 */
        /*0040*/                   EXIT ;                                 /* 0x000000000000794d */
"""
    mix = sass.hottest_loop_mix(text)
    assert mix.total == 3 and mix.counts["lds"] == 1 and mix.counts["fp32"] == 1


NESTED = """
.L_x_0:
        /*0000*/                   HMMA.16816.F32 R16, R12, R8, R16 ;
.L_x_1:
        /*0010*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0020*/                   STS.128 [R9], R8 ;
        /*0030*/               @P0 BRA `(.L_x_1) ;
        /*0040*/                   LDS R6, [R3] ;
        /*0050*/                   FFMA R7, R6, R6, R7 ;
        /*0060*/               @P1 BRA `(.L_x_0) ;
        /*0070*/                   EXIT ;
"""


def test_loops_separate_a_nested_loop_from_its_parent():
    # the parent's own instructions exclude the nested (dequantizing) loop: what tools/cuda_report.py divides by the
    # keys of one sub-step
    outer, inner = sorted(sass.loops(NESTED), key=lambda lp: lp.start)
    assert outer.contains(inner) and not inner.contains(outer)
    assert inner.body == inner.own and inner.own["ldg"] == 1 and inner.own["sts"] == 1 and inner.own["total"] == 3
    assert outer.body["total"] == 7 and outer.body["ldg"] == 1
    assert outer.own == dict(mma=1, fp32=1, lds=1, sts=0, ldg=0, mufu=0, total=4)
