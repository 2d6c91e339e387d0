# Debian's xsimd 8 exports its target with INTERFACE_LINK_LIBRARIES "xtl" but its config never finds
# xtl, so linking xsimd asks the linker for -lxtl. xsimd does not need xtl for what we use; an empty
# imported target of that name satisfies the reference.
if(TARGET xsimd AND NOT TARGET xtl)
  add_library(xtl INTERFACE IMPORTED)
endif()
