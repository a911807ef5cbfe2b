module modelmake/gotemplate

go 1.19
